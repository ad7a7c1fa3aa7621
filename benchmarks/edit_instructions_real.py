"""Real records: the instructed editor trained the 0.1 way (instructed-query loss), scored
on plain and on instructed queries, on the base model and split of ``edit_quality.py``.

``edit_quality.py --part real`` leaves its base model and training file in a
``kvtool-real-*`` folder under the temporary directory; pass that folder.

Usage: .venv/bin/python benchmarks/edit_instructions_real.py /tmp/kvtool-real-<suffix> > runs.jsonl
(one JSON line per seed; benchmarks/results/edit_instructions_real.md sets them beside the
plain-query editors of edit_quality_real.md).
"""

from __future__ import annotations

import json
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path()


def one(seed: int) -> tuple[int, dict]:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import edit_quality as eq

    from kedit_vfl.edit.algs.hypernetwork import HypernetworkEdit
    from kedit_vfl.edit.config import TrainConfig
    from kedit_vfl.edit.editor.batches import Prompter
    from kedit_vfl.edit.editor.training import train_editor
    from kedit_vfl.edit.evaluation.evaluate import evaluate

    records = eq._real_records(200)
    test = {}
    for task, items in records.items():
        order = list(range(len(items)))
        random.Random(f"real/{task}").shuffle(order)
        n_test = len(items) if task == eq.HOLDOUT else max(1, len(items) // 5)
        test[task] = [items[i] for i in order[:n_test]]
    config = TrainConfig(
        model=str(ROOT / "base"),
        device="cpu",
        data=(str(ROOT / "train.jsonl"),),
        tasks=eq.TRAIN_TASKS,
        holdout=eq.HOLDOUT,
        seed=seed,
        instructed_queries=True,
    )
    result = train_editor(config)
    out = {}
    for q in ("plain", "instructed"):
        method = HypernetworkEdit(
            "instructedit",
            result.editor,
            Prompter(result.pools, index=0),
            Prompter(None) if q == "plain" else None,
        )
        s = evaluate(method, result.base, test)
        out[q] = {
            t: {k: v[k] for k in ("reliability", "generalization", "locality")} for t, v in s["tasks"].items()
        }
    return seed, out


if __name__ == "__main__":
    with ProcessPoolExecutor(2) as pool:
        for seed, out in pool.map(one, [0, 1, 2]):
            print(json.dumps({"seed": seed, **out}), flush=True)
