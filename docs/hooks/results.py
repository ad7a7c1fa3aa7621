"""MkDocs hook: the benchmark results' images are part of the site, so the tables
included from ``benchmarks/results/`` keep their pictures (and strict mode its links)."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def on_files(files: Files, config) -> Files:  # noqa: ANN001 - MkDocs' hook signature
    for image in sorted(RESULTS.glob("*.png")):
        files.append(File(image.name, str(RESULTS), config["site_dir"], config["use_directory_urls"]))
    return files
