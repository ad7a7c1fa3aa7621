"""Several edits at once: how the editor's quality falls as edits are applied together or in a row.

On the embedded world (seed 0), editors trained with the defaults (one edit per
meta-training step) and with ``--batch-size 4``, over several seeds, each scored on the
test split under the protocols of ``kvtool edit evaluate``:

- one edit at a time, rolled back (the default);
- ``--batch N``: N edits of a task together, as ``apply`` applies them (each update
  computed on the unedited model, the updates summed);
- ``--sequential N``: N edits of a task one after another, each computed on the model
  the previous ones left;

and, as ``kvtool edit apply`` is used, the first 8, 16 and 32 test edits of all tasks
(interleaved) in one call: how many hold (every target token the top-1 after the edit).
Also the size of single updates against the weights they change (Frobenius norms).

Usage: .venv/bin/python benchmarks/edit_multi.py [--seeds 0 1 2] [--jobs 2]
Writes benchmarks/results/edit_multi.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_TASKS = ("counterfact", "recent", "convsent")
HOLDOUT = "zsre"
TRAIN_BATCH_SIZES = (1, 4)
PROTOCOLS = (
    ("one at a time", {}),
    ("--batch 2", {"batch": 2}),
    ("--batch 4", {"batch": 4}),
    ("--batch 8", {"batch": 8}),
    ("--batch 16", {"batch": 16}),
    ("--sequential 2", {"sequential": 2}),
    ("--sequential 4", {"sequential": 4}),
)
APPLY_SIZES = (8, 16, 32)
METRICS = ("reliability", "generalization", "locality")


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one editor, then score it under every protocol (runs in a worker process)."""
    import torch

    torch.set_num_threads(1)
    from kedit_vfl.edit.algs.hypernetwork import HypernetworkEdit, compute_update
    from kedit_vfl.edit.config import TrainConfig, WorldOptions
    from kedit_vfl.edit.data.sources import embedded_world, interleaved
    from kedit_vfl.edit.editor.apply import edit_updates, holds, target_scores
    from kedit_vfl.edit.editor.batches import Prompter
    from kedit_vfl.edit.editor.network import edited_params
    from kedit_vfl.edit.editor.training import train_editor
    from kedit_vfl.edit.evaluation.evaluate import evaluate

    config = TrainConfig(seed=job["seed"], batch_size=job["batch_size"], device="cpu", steps=job["steps"])
    started = time.perf_counter()
    result = train_editor(config)
    seconds = time.perf_counter() - started
    test = embedded_world(WorldOptions()).records["test"]
    prompter = Prompter(result.pools, index=0)
    scored = {t: list(test[t]) for t in (*TRAIN_TASKS, HOLDOUT)}
    protocols = {}
    for name, options in PROTOCOLS:
        method = HypernetworkEdit("instructedit", result.editor, prompter)
        summary = evaluate(method, result.base, scored, **options)
        protocols[name] = {t: {m: summary["tasks"][t][m] for m in METRICS} for t in scored}
    mixed = interleaved([scored[t] for t in sorted(scored)])
    applied = {}
    for size in APPLY_SIZES:
        edits = mixed[:size]
        updates = edit_updates(result.editor, result.base, edits, prompter, 32)
        _, accs = target_scores(result.base, edits, prompter, edited_params(result.base.model, updates))
        applied[size] = {"held": sum(holds(a) for a in accs), "acc": statistics.mean(accs)}
    weights = dict(result.base.model.named_parameters())
    ratios: dict[str, list[float]] = {}
    with torch.no_grad():
        for record in mixed:
            for name, update in compute_update(result.editor, result.base, [record], prompter).items():
                ratios.setdefault(name, []).append(float(update.norm() / weights[name].norm()))
    every = [r for values in ratios.values() for r in values]
    return {
        "batch_size": job["batch_size"],
        "seed": job["seed"],
        "train_seconds": seconds,
        "best_step": result.best.get("step"),
        "protocols": protocols,
        "apply": applied,
        "update_norm_ratio": {
            "median": statistics.median(every),
            "max": max(every),
            "median_per_layer": {k: statistics.median(v) for k, v in ratios.items()},
        },
    }


def _trained_mean(cell: dict[str, dict[str, float]], metric: str) -> float:
    return statistics.mean(cell[t][metric] for t in TRAIN_TASKS)


def _markdown(runs: list[dict[str, Any]], seeds: list[int], wall: float) -> str:
    by_size = {b: [r for r in runs if r["batch_size"] == b] for b in TRAIN_BATCH_SIZES}
    lines = [
        "# Several edits at once (embedded world, seed 0, test split)",
        "",
        f"Editors trained with `--batch-size` {' and '.join(map(str, TRAIN_BATCH_SIZES))}, seeds {seeds}; "
        "trained-task means (counterfact, recent, convsent), then the mean over seeds. "
        f"Wall time {wall:.0f} s.",
        "",
        "| protocol | "
        + " | ".join(f"R / G / L (`--batch-size {b}` editor)" for b in TRAIN_BATCH_SIZES)
        + " |",
        "| --- |" + " ---: |" * len(TRAIN_BATCH_SIZES),
    ]
    for name, _ in PROTOCOLS:
        cells = []
        for b in TRAIN_BATCH_SIZES:
            values = [
                statistics.mean(_trained_mean(r["protocols"][name], m) for r in by_size[b]) for m in METRICS
            ]
            cells.append(" / ".join(f"{v:.3f}" for v in values))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| edits in one `apply` (tasks mixed) | "
        + " | ".join(f"held per seed (`--batch-size {b}` editor)" for b in TRAIN_BATCH_SIZES)
        + " |",
        "| ---: |" + " --- |" * len(TRAIN_BATCH_SIZES),
    ]
    for size in APPLY_SIZES:
        cells = [", ".join(str(r["apply"][str(size)]["held"]) for r in by_size[b]) for b in TRAIN_BATCH_SIZES]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    lines.append("")
    for b in TRAIN_BATCH_SIZES:
        medians = [r["update_norm_ratio"]["median"] for r in by_size[b]]
        highest = max(r["update_norm_ratio"]["max"] for r in by_size[b])
        lines.append(
            f"- `--batch-size {b}` editors: one edit's update has a Frobenius norm of "
            f"{min(medians):.2f}-{max(medians):.2f} (median over the test edits and edited weights) "
            f"of the weight it changes, at most {highest:.2f}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="parallel training processes")
    parser.add_argument(
        "--steps", type=int, default=None, help="meta-training steps (default: train-editor's)"
    )
    args = parser.parse_args()
    from kedit_vfl.edit.config import TrainConfig

    steps = args.steps or TrainConfig.steps
    jobs = [{"batch_size": b, "seed": s, "steps": steps} for b in TRAIN_BATCH_SIZES for s in args.seeds]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(run_one, jobs))
    runs = json.loads(json.dumps(runs))  # integer keys become strings, as in the saved file
    markdown = _markdown(runs, args.seeds, time.perf_counter() - started)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edit_multi.json").write_text(json.dumps({"runs": runs}, indent=2))
    (RESULTS / "edit_multi.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
