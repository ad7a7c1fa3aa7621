"""Label leakage against cost: every defence of ``train-split`` on the same grid cells.

Runs ``vfl_grid.py`` once per defence (none, a frozen publisher tower, randomised
response at two epsilons) on the data sets' given splits, overlap 0.6, labelled 0.05
and 0.2, three seeds, each with the leakage audit of VFed-SSD's split training, then
tabulates per data set and defence: the worst accumulated attack AUC over the runs (the
best attack on each row's gradients summed over the whole run), and VFed-SSD's
federated and local AUC with their relative change against no defence.
Runs already on file are not run again.

Run: .venv/bin/python benchmarks/vfl_label_privacy.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFENCES = ("none", "freeze-passive", "label-epsilon=1", "label-epsilon=0.4")
GRID = [
    "--datasets", "give_credit,default_credit,adult,movie_lens", "--splits", "given",
    "--overlaps", "0.6", "--labelled", "0.05,0.2", "--seeds", "0,1,2",
]  # fmt: skip


def runs_file(defence: str) -> Path:
    return RESULTS / f"vfl_label_privacy_{defence.replace('=', '_')}.jsonl"


def main() -> None:
    for defence in DEFENCES:
        out = runs_file(defence).with_suffix(".md")
        command = [sys.executable, str(ROOT / "benchmarks" / "vfl_grid.py"), *GRID, "--jobs", "2"]
        subprocess.run(
            [*command, "--defence", defence, "--out", str(out)], check=True, stdout=subprocess.DEVNULL
        )
    runs = {d: [json.loads(line) for line in runs_file(d).read_text().splitlines()] for d in DEFENCES}
    datasets = sorted({r["cell"].split("|")[0] for r in runs["none"]})
    lines = [
        "# Label leakage and its cost, per defence",
        "",
        "Given splits, overlap 0.6, labelled 0.05 and 0.2, seeds 0,1,2. *Leak*: the worst, over the "
        "runs, of the best attack's AUC on each row's gradients summed over the run (0.5: the "
        "gradients tell nothing; - : no gradient crossed in any run). AUC: VFed-SSD's mean test AUC, "
        "and its relative change against no defence.",
        "",
        "| data set | defence | leak (worst) | runs where gradients crossed | federated AUC | change | "
        "local AUC | change |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in datasets:
        base = {m: _mean(runs["none"], name, m) for m in ("VFed-SSD federated", "VFed-SSD local")}
        for defence in DEFENCES:
            mine = [r for r in runs[defence] if r["cell"].startswith(name + "|")]
            crossed = [r["label_leakage"]["accumulated"] for r in mine if r["label_leakage"]["rows"]]
            leak = f"{max(crossed):.3f}" if crossed else "-"
            fed, local = (_mean(runs[defence], name, m) for m in ("VFed-SSD federated", "VFed-SSD local"))
            lines.append(
                f"| {name} | {defence} | {leak} | {len(crossed)} of {len(mine)} | {fed:.4f} | "
                f"{fed / base['VFed-SSD federated'] - 1:+.2%} | {local:.4f} | "
                f"{local / base['VFed-SSD local'] - 1:+.2%} |"
            )
    text = "\n".join(lines) + "\n"
    (RESULTS / "vfl_label_privacy.md").write_text(text)
    print(text)


def _mean(runs: list[dict], dataset: str, model: str) -> float:
    return float(np.mean([r["models"][model]["auc"] for r in runs if r["cell"].startswith(dataset + "|")]))


if __name__ == "__main__":
    main()
