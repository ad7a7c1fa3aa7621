"""Real records: where the instruction enters the editor, against MEND, on plain queries.

On the base model and split of ``edit_quality.py --part real`` (which leaves them in a
``kvtool-real-*`` folder under the temporary directory; pass that folder), per seed:

- ``conditioned``: the editor reads the plain prompt's gradient; the instruction's
  embedding scales and shifts its features (``--instruction-input condition``);
- ``prefix``: the instruction prefixes the prompt whose gradient the editor reads, the
  edit loss on the plain prompts (the default of 0.2);
- ``prefix, instructed-query loss``: the same with the edit loss on the instructed
  prompts (the default of 0.1), also scored on instructed queries;
- ``plain (MEND)``: no instructions.

Usage: .venv/bin/python benchmarks/edit_instructions_real.py /tmp/kvtool-real-<suffix> [--seeds 0,1,2]
Writes benchmarks/results/edit_instructions_real.{json,md}; runs already in the JSON are kept.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS: dict[str, dict[str, Any]] = {  # name -> TrainConfig / EditorConfig fields
    "conditioned": {"editor": {"instruction_input": "condition"}},
    "prefix": {"editor": {"instruction_input": "prefix"}},
    "prefix, instructed-query loss": {"instructed_queries": True, "editor": {"instruction_input": "prefix"}},
    "plain (MEND)": {"instructions": False},
}
TRAINED = ("counterfact", "recent", "convsent")


def one(job: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import edit_quality as eq

    from kedit_vfl.edit.algs.hypernetwork import HypernetworkEdit
    from kedit_vfl.edit.config import EditorConfig, TrainConfig
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
    fields = dict(VARIANTS[job["variant"]])
    editor = EditorConfig(**fields.pop("editor", {}))
    root = Path(job["root"])
    config = TrainConfig(
        model=str(root / "base"),
        device="cpu",
        data=(str(root / "train.jsonl"),),
        tasks=eq.TRAIN_TASKS,
        holdout=eq.HOLDOUT,
        seed=job["seed"],
        editor=editor,
        **fields,
    )
    result = train_editor(config)
    rows = []
    asked = ("plain", "instructed") if config.instructed_queries else ("plain",)
    for queries in asked:
        prompter = Prompter(result.pools, index=0)
        method = HypernetworkEdit(
            "edit", result.editor, prompter, Prompter(None) if queries == "plain" else None
        )
        summary = evaluate(method, result.base, test)
        tasks = {
            t: {k: v[k] for k in ("reliability", "generalization", "locality")}
            for t, v in summary["tasks"].items()
        }
        rows.append({"variant": job["variant"], "seed": job["seed"], "queries": queries, "tasks": tasks})
    return rows


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def table(runs: list[dict[str, Any]], seeds: list[int]) -> str:
    lines = [
        "## Where the instruction enters, on the real records",
        "",
        "The real-records base model and split of `edit_quality.py` (`edit_quality_real.md`), "
        f"seeds {seeds}, "
        "mean ± std. Trained tasks: counterfact, recent, convsent (R and L their mean; convsent R "
        "beside); zsre held out. Scored on the plain prompts a user asks after `apply` unless "
        "*queries* says instructed. `benchmarks/edit_instructions_real.py`.",
        "",
        "| editor | queries | trained R | convsent R | trained L | zsre R | zsre G | zsre L |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        for queries in ("plain", "instructed"):
            group = [
                r for r in runs if r["variant"] == variant and r["queries"] == queries and r["seed"] in seeds
            ]
            if not group:
                continue

            def mean_of(run: dict[str, Any], metric: str) -> float:
                values = [run["tasks"][t][metric] for t in TRAINED if run["tasks"][t][metric] is not None]
                return statistics.mean(values)

            cells = [
                spread([mean_of(r, "reliability") for r in group]),
                spread([r["tasks"]["convsent"]["reliability"] for r in group]),
                spread([mean_of(r, "locality") for r in group]),
                *(
                    spread([r["tasks"]["zsre"][m] for r in group])
                    for m in ("reliability", "generalization", "locality")
                ),
            ]
            lines.append(f"| {variant} | {queries} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the kvtool-real-* folder edit_quality.py left")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = RESULTS / "edit_instructions_real.json"
    runs: list[dict[str, Any]] = json.loads(out.read_text())["runs"] if out.exists() else []
    done = {(r["variant"], r["seed"]) for r in runs}
    jobs = [
        {"variant": v, "seed": s, "root": str(args.root)}
        for v in VARIANTS
        for s in seeds
        if (v, s) not in done
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        for rows in pool.map(one, jobs):
            runs.extend(rows)
            out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    text = table(runs, seeds)
    (RESULTS / "edit_instructions_real.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
