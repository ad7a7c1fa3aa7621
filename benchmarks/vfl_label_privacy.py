"""Label leakage against cost: every defence of ``train-split`` on the same grid cells.

Runs ``vfl_grid.py`` once per defence (none, a frozen publisher tower, calibrated
gradient noise, randomised response at two epsilons) on the data sets' given splits,
overlap 0.6, labelled 0.05 and 0.2, three seeds, each with the leakage audit of
VFed-SSD's split training, then tabulates per data set and defence: the worst
accumulated attack AUC over the runs (the best attack on each row's gradients summed
over the whole run), and VFed-SSD's federated and local AUC with their relative change
against no defence. Runs already on file are not run again.

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
DEFENCES = ("none", "freeze-passive", "calibrated-noise=0.5", "label-epsilon=1", "label-epsilon=0.4")
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
    lines += whole_grid()
    text = "\n".join(lines) + "\n"
    (RESULTS / "vfl_label_privacy.md").write_text(text)
    print(text)


def whole_grid() -> list[str]:
    """The default (frozen tower) against a trained one over the whole quality grid:
    ``vfl_grid.jsonl`` and ``vfl_grid_train_passive.jsonl`` (``vfl_grid.py --defence none
    --out benchmarks/results/vfl_grid_train_passive.md``), where both are on file."""
    files = [RESULTS / "vfl_grid.jsonl", RESULTS / "vfl_grid_train_passive.jsonl"]
    if not all(f.exists() for f in files):
        return []
    frozen, trained = ({} for _ in files)
    for table, path in zip((frozen, trained), files, strict=True):
        for line in path.read_text().splitlines():
            run = json.loads(line)
            table.setdefault(run["cell"], []).append(run)
    lines = [
        "",
        "Over the whole quality grid (every data set, both splits, both overlaps, three label rates, three "
        "seeds): VFed-SSD with the publisher's tower frozen (the default) against trained "
        "(`--train-passive`), relative change of the mean AUC per cell, summarised per data set and split.",
        "",
        "| data set | split | federated: mean change | worst cell | local: mean change | worst cell |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for cell in sorted(set(frozen) & set(trained)):
        key = tuple(cell.split("|")[:2])
        for model in ("VFed-SSD federated", "VFed-SSD local"):
            new = np.mean([r["models"][model]["auc"] for r in frozen[cell]])
            old = np.mean([r["models"][model]["auc"] for r in trained[cell]])
            groups.setdefault(key, {}).setdefault(model, []).append(new / old - 1)
    for (name, split), changes in groups.items():
        fed, local = changes["VFed-SSD federated"], changes["VFed-SSD local"]
        lines.append(
            f"| {name} | {split} | {np.mean(fed):+.2%} | {min(fed):+.2%} | {np.mean(local):+.2%} | "
            f"{min(local):+.2%} |"
        )
    return lines


def _mean(runs: list[dict], dataset: str, model: str) -> float:
    return float(np.mean([r["models"][model]["auc"] for r in runs if r["cell"].startswith(dataset + "|")]))


if __name__ == "__main__":
    main()
