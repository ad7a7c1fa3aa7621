"""Start-up time of the command line, beside a bare interpreter, in one run.

Each command runs ``--repeats`` times as a fresh process (stdout and stderr discarded);
the median wall time is reported with its ratio to ``python -c pass``. Also checked: that
none of them imports PyTorch, Arrow or transformers.

Run: .venv/bin/python benchmarks/cli_startup.py [--repeats 21]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KVTOOL = str(Path(sys.executable).parent / "kvtool")
HEAVY = ("torch", "pyarrow", "transformers", "datasets", "pandas")
PROBE = (
    "import sys\nfrom kedit_vfl import launch\nsys.argv[0] = 'kvtool'\nstatus = launch.run()\n"
    f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\nsys.exit(status)"
)


def median_seconds(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def heavy_imports(args: list[str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    line = next((x for x in done.stderr.splitlines() if x.startswith("HEAVY")), "HEAVY ['?']")
    return eval(line.removeprefix("HEAVY "))  # noqa: S307 - our own probe's list literal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from kedit_vfl.artifacts import Artifact, make_provenance, save_artifact

    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "m.safetensors"
        save_artifact(
            Artifact("vfl.mpd", {"w": torch.zeros(64, 64)}, {}, make_provenance("bench", {})), artifact
        )
        cases = [
            ("--version", ["--version"]),
            ("--help", ["--help"]),
            ("vfl score --help", ["vfl", "score", "--help"]),
            ("edit apply --help", ["edit", "apply", "--help"]),
            ("info FILE", ["info", str(artifact)]),
        ]
        bare = median_seconds([sys.executable, "-c", "pass"], args.repeats)
        rows = [{"command": "python -c pass", "ms": bare * 1000, "ratio": 1.0, "heavy": []}]
        for name, argv in cases:
            seconds = median_seconds([KVTOOL, *argv], args.repeats)
            rows.append({"command": f"kvtool {name}", "ms": seconds * 1000, "ratio": seconds / bare,
                         "heavy": heavy_imports(argv)})  # fmt: skip
    lines = [
        f"### Start-up: median of {args.repeats} fresh processes each, one run, this machine",
        "",
        "| command | median ms | x `python -c pass` | heavy modules imported |",
        "| --- | ---: | ---: | --- |",
    ]
    for row in rows:
        heavy = ", ".join(row["heavy"]) or "none"
        lines.append(f"| `{row['command']}` | {row['ms']:.0f} | {row['ratio']:.1f}x | {heavy} |")
    lines += [
        "",
        "Target: `kvtool --version` <= 6x `python -c pass`; none imports PyTorch, Arrow or transformers.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cli_startup.md").write_text(text)
    (RESULTS / "cli_startup.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
