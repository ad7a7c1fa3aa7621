"""Gradient analysis on the embedded world: InstructEdit vs the no-instruction multi-task editor.

Trains (or reuses, with --editor/--compare) two editors over counterfact, recent and
convsent with zsre held out, one with instructions and one with --no-instructions, then
runs ``kvtool edit analyze-gradients`` through the real CLI on 100 test records per task
and reports the separation numbers, the time and the peak memory of the analysis.

Usage: .venv/bin/python benchmarks/edit_gradients.py [--seeds 0 1] [--steps 4000] [--per-task 100]
Writes benchmarks/results/edit_gradients.{md,json} and edit_gradients.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = "counterfact,recent,convsent"


def kvtool(*args: str) -> tuple[dict, float, int]:
    """Run ``kvtool ARGS --json`` in a fresh process: (result, seconds, peak RSS in MiB)."""
    command = [sys.executable, "-m", "kedit_vfl", *args, "--json", "--quiet"]
    started = time.perf_counter()
    process = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *command] if Path("/usr/bin/time").exists() else command,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"kvtool {' '.join(args)} failed:\n{process.stderr}")
    lines = process.stderr.strip().splitlines()
    peak_kib = int(lines[-1]) if lines and lines[-1].isdigit() else 0
    return json.loads(process.stdout), seconds, peak_kib // 1024


def train(out: Path, seed: int, steps: int, instructions: bool) -> Path:
    args = ["edit", "train-editor", "--tasks", TASKS, "--holdout", "zsre", "--steps", str(steps)]
    args += ["--seed", str(seed), "--device", "cpu", "--out", str(out)]
    if not instructions:
        args.append("--no-instructions")
    kvtool(*args)
    return out


def raw_factor_separation(editor: Path, per_task: int) -> list[dict]:
    """Diagnosis: do the base model's own gradient factors (before any editor) carry the task?

    Mean over target tokens of each edited layer's input ``x`` and output gradient
    ``delta``, with and without the instruction prefix: if the prefix leaves these nearly
    unchanged, no editor can turn it into task-specific update directions.
    """
    import numpy as np
    import torch

    from kedit_vfl.edit.editor.batches import Prompter, edit_batch
    from kedit_vfl.edit.editor.network import edit_gradients
    from kedit_vfl.edit.editor.store import load_editor, open_editor_base
    from kedit_vfl.edit.evaluation.analysis import separation_report
    from kedit_vfl.edit.evaluation.gradients import AnalyzeConfig, analysis_records

    loaded = load_editor(editor)
    base = open_editor_base(loaded, None, "cpu", "float32", str(editor))
    records = analysis_records(AnalyzeConfig(editor=str(editor), out="unused", per_task=per_task), loaded)
    labels = [task for task, items in records.items() for _ in items]
    rows = []
    for prefix in (True, False):
        prompter = Prompter(loaded.pools if prefix else None)
        xs, deltas = [], []
        for items in records.values():
            for record in items:
                batch = edit_batch([record], prompter, base.tokenizer, base.max_length)
                grads = edit_gradients(base.model, base.targets, batch)
                xs.append(torch.cat([grads[t.module].x.float().mean(0) for t in base.targets]).numpy())
                deltas.append(
                    torch.cat([grads[t.module].delta.float().mean(0) for t in base.targets]).numpy()
                )
        for factor, features in (("x (layer inputs)", xs), ("delta (output gradients)", deltas)):
            report = separation_report(np.stack(features), labels, holdout="zsre")
            rows.append(
                {
                    "factor": factor,
                    "prefix": prefix,
                    "silhouette_reduced": report["silhouette_reduced"],
                    "cosine_ratio": report["cosine"]["ratio"],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--editor", type=Path, nargs="+", help="reuse InstructEdit editors (one per seed)")
    parser.add_argument("--compare", type=Path, nargs="+", help="reuse no-instruction editors (one per seed)")
    args = parser.parse_args()
    if args.editor or args.compare:
        if not args.editor or not args.compare or len(args.editor) != len(args.compare):
            parser.error("--editor and --compare take one editor per seed each, as many of both")
        args.seeds = args.seeds[: len(args.editor)]

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, seed in enumerate(args.seeds):
            if args.editor:
                instructed, plain = args.editor[index], args.compare[index]
            else:
                instructed = train(Path(tmp) / f"ie-{seed}.safetensors", seed, args.steps, True)
                plain = train(Path(tmp) / f"plain-{seed}.safetensors", seed, args.steps, False)
            out = Path(tmp) / f"analysis-{seed}"
            result, seconds, peak = kvtool(
                "edit", "analyze-gradients", "--editor", str(instructed), "--compare", str(plain),
                "--per-task", str(args.per_task), "--device", "cpu", "--out", str(out), "--seed", str(seed),
            )  # fmt: skip
            runs.append({"seed": seed, "seconds": seconds, "peak_mib": peak, "result": result})
            if seed == args.seeds[0]:
                RESULTS.mkdir(parents=True, exist_ok=True)
                shutil.copy(out / "gradients.png", RESULTS / "edit_gradients.png")
        diagnosis = raw_factor_separation(Path(runs[0]["result"]["settings"]["editor"]), args.per_task)

    names = ("InstructEdit (instructions)", "multi-task, no instructions")
    representation = runs[0]["result"]["representation"]
    origin = "given with --editor/--compare" if args.editor else f"trained {args.steps} steps"
    lines = [
        "## Editor update directions by task (embedded world, zsre held out)",
        "",
        f"Up to {args.per_task} records per task (test, then validation and train records), "
        f"editors {origin} on {TASKS};"
        f" seeds {', '.join(str(r['seed']) for r in runs)} (mean ± std). Representation: "
        f"{representation['kind']} ({representation['size']} dims).",
        "",
        "| editor | silhouette 2-D | silhouette 90% | PCs for 90% | between/within cos | zsre nearest |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    summary = {}
    for index, name in enumerate(names):
        panels = [r["result"]["panels"][index] for r in runs]

        def stat(values: list[float]) -> str:
            return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"

        nearest = ", ".join(p.get("holdout", {}).get("nearest", "-") for p in panels)
        cells = {
            "silhouette_2d": [p["silhouette_2d"] for p in panels],
            "silhouette_reduced": [p["silhouette_reduced"] for p in panels],
            "n_components_90": [float(p["n_components_90"]) for p in panels],
            "cosine_ratio": [p["cosine"]["ratio"] for p in panels],
        }
        summary[name] = {k: statistics.mean(v) for k, v in cells.items()} | {"zsre_nearest": nearest}
        lines.append(f"| {name} | " + " | ".join(stat(v) for v in cells.values()) + f" | {nearest} |")
    lines += [
        "",
        "| analysis run (both editors, 4 tasks) | seconds | peak RSS (MiB) |",
        "| --- | ---: | ---: |",
        *[f"| seed {r['seed']} | {r['seconds']:.1f} | {r['peak_mib']} |" for r in runs],
        "",
        "Diagnosis: the base model's own gradient factors (mean over target tokens, before any editor),",
        "for the same records with and without the instruction prefix:",
        "",
        "| factor | instruction prefix | silhouette 90% | between/within cos |",
        "| --- | --- | ---: | ---: |",
        *[
            f"| {d['factor']} | {'yes' if d['prefix'] else 'no'} | {d['silhouette_reduced']:.3f} "
            f"| {d['cosine_ratio']:.3f} |"
            for d in diagnosis
        ],
        "",
        "![update directions](edit_gradients.png)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / "edit_gradients.md").write_text(text)
    (RESULTS / "edit_gradients.json").write_text(
        json.dumps({"summary": summary, "diagnosis": diagnosis, "runs": runs}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
