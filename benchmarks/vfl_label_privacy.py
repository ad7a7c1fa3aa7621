"""Label leakage against cost: every defence of ``train-split`` on the same grid cells.

Runs ``vfl_grid.py`` once per defence (none, a frozen publisher tower, calibrated
gradient noise, randomised response at two epsilons) on the data sets' given splits,
overlap 0.6, labelled 0.05 and 0.2, three seeds, each with the leakage audit of
VFed-SSD's split training, then tabulates per data set and defence: the worst
accumulated attack AUC over the runs (the best attack on each row's gradients summed
over the whole run), and VFed-SSD's federated and local AUC with their relative change
against no defence. Runs already on file are not run again.

With ``--summarise-only`` it tabulates the runs on file and runs nothing. The second
table compares the defences run over the whole quality grid (see :data:`WHOLE_GRID`).

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
    summarise_only = "--summarise-only" in sys.argv[1:]
    for defence in DEFENCES if not summarise_only else ():
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


WHOLE_GRID = {  # defence -> the whole-grid runs file (vfl_grid.py --defence D --out ...md)
    "none": "vfl_grid_train_passive.jsonl",
    "freeze-passive (default)": "vfl_grid.jsonl",
    "calibrated-noise=1": "vfl_grid_calibrated_noise_1.jsonl",
    "label-epsilon=1": "vfl_grid_label_epsilon_1.jsonl",
}


def whole_grid() -> list[str]:
    """Every defence run over the whole quality grid against no defence (a trained
    publisher tower), per data set and split: the worst leak, and the relative change of
    the mean AUC per cell (mean and worst cell). Defences without a runs file are left out."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for defence, name in WHOLE_GRID.items():
        path = RESULTS / name
        if path.exists():
            for line in path.read_text().splitlines():
                run = json.loads(line)
                runs.setdefault(defence, {}).setdefault(run["cell"], []).append(run)
    if "none" not in runs or len(runs) < 2:
        return []
    base = runs["none"]
    lines = [
        "",
        "Over the whole quality grid (every data set, both splits, both overlaps, three label rates, three "
        "seeds; `python benchmarks/vfl_grid.py --defence D --out ...`): each defence against no defence "
        "(the publisher's tower trained, `--train-passive`). Leak: the worst accumulated attack AUC over "
        "the runs (- : no gradient crossed; without a defence it is 1.000 on every audited cell above); "
        "changes: relative change of VFed-SSD's mean AUC per cell, "
        "the mean over the cells and the worst cell.",
        "",
        "| data set | split | defence | cells | leak (worst) | federated: mean change | worst cell | "
        "local: mean change | worst cell |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = sorted({tuple(cell.split("|")[:2]) for cell in base})
    for name, split in keys:
        for defence, table in runs.items():
            cells = [c for c in table if c in base and tuple(c.split("|")[:2]) == (name, split)]
            if not cells:
                continue
            crossed = [
                r["label_leakage"]["accumulated"]
                for c in cells
                for r in table[c]
                if r.get("label_leakage") and r["label_leakage"]["rows"]
            ]
            changes = {}
            for model in ("VFed-SSD federated", "VFed-SSD local"):
                changes[model] = [
                    np.mean([r["models"][model]["auc"] for r in table[c]])
                    / np.mean([r["models"][model]["auc"] for r in base[c]])
                    - 1
                    for c in cells
                ]
            fed, local = changes["VFed-SSD federated"], changes["VFed-SSD local"]
            audited = any(r.get("label_leakage") for c in cells for r in table[c])
            leak = f"{max(crossed):.3f}" if crossed else "-" if audited else "not audited"
            lines.append(
                f"| {name} | {split} | {defence} | {len(cells)} | {leak} | {np.mean(fed):+.2%} | "
                f"{min(fed):+.2%} | {np.mean(local):+.2%} | {min(local):+.2%} |"
            )
    return lines


def _mean(runs: list[dict], dataset: str, model: str) -> float:
    return float(np.mean([r["models"][model]["auc"] for r in runs if r["cell"].startswith(dataset + "|")]))


if __name__ == "__main__":
    main()
