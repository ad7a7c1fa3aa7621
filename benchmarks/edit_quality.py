"""Edit quality: InstructEdit against multi-task MEND without instructions and single-task editors.

Part ``embedded``: on the embedded world, per task (zsre as the hold-out task)
Reliability, Generalization, Locality and Portability of
- InstructEdit: one editor over counterfact, recent, convsent with instructions;
- multi-task without instructions: the same editor trained with --no-instructions;
- single-task editors: one per training task (no instructions), scored on its own task
  and on the hold-out task;
each over several seeds (mean and standard deviation).

Part ``real``: the public samples in ../shared/data/edit through the same pipeline: a
base model pretrained on their true facts (prompt + ground truth, locality facts
included, and the instruction descriptions as plain texts, as for the embedded base
model), an editor trained on KnowEdit WikiData-CounterFact + WikiData-Recent +
ConvSent, and the ZsRE records held out.

Usage: .venv/bin/python benchmarks/edit_quality.py [--part embedded|real|all] [--seeds 0 1 2]
       [--steps N] [--jobs J] [--queries plain|instructed]   (runs are independent; --jobs runs
       them in parallel processes)
Writes benchmarks/results/edit_quality_{embedded,real}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
EDITORS = Path("runs") / "bench_editors"  # trained editors kept for ablations (not committed)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "edit"
TRAIN_TASKS = ("counterfact", "recent", "convsent")
HOLDOUT = "zsre"
METRICS = ("reliability", "generalization", "locality", "portability")
REAL_FILES = {
    "counterfact": "knowedit_wiki_counterfact_train.sample.json",
    "recent": "knowedit_wiki_recent_train.sample.json",
    "convsent": "convsent_blender_test.sample.json",
    "zsre": "knowedit_zsre_test.sample.json",
}


def _variants(steps: int) -> dict[str, dict[str, Any]]:
    variants: dict[str, dict[str, Any]] = {
        "instructedit": {"tasks": TRAIN_TASKS, "instructions": True},
        "multitask_no_instructions": {"tasks": TRAIN_TASKS, "instructions": False},
    }
    for task in TRAIN_TASKS:
        variants[f"single_{task}"] = {"tasks": (task,), "instructions": False}
    return {name: {**v, "steps": steps} for name, v in variants.items()}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one editor and evaluate it on the test records (runs in a worker process)."""
    import torch

    torch.set_num_threads(job.get("threads", 1))
    from kedit_vfl.edit.algs.hypernetwork import HypernetworkEdit
    from kedit_vfl.edit.config import TrainConfig
    from kedit_vfl.edit.data.records import EditRecord
    from kedit_vfl.edit.editor.batches import Prompter
    from kedit_vfl.edit.editor.training import train_editor
    from kedit_vfl.edit.evaluation.evaluate import evaluate

    config = TrainConfig(
        model=job["model"],
        device="cpu",
        data=tuple(job.get("data", ())),
        tasks=tuple(job["tasks"]),
        holdout=HOLDOUT,
        instructions=job["instructions"],
        steps=job["steps"],
        seed=job["seed"],
    )
    if job.get("overrides"):
        config = replace(config, **job["overrides"])
    started = time.perf_counter()
    result = train_editor(config)
    seconds = time.perf_counter() - started
    if job.get("save"):
        _save_editor(result, config, Path(job["save"]))
    test = {t: [EditRecord.from_dict(r) for r in rs] for t, rs in job["test"].items()}
    scored = {t: test[t] for t in (*job["tasks"], HOLDOUT) if test.get(t)}
    queries = Prompter(None) if job.get("queries", "plain") == "plain" else None  # None: instructed
    method = HypernetworkEdit("instructedit", result.editor, Prompter(result.pools, index=0), queries)
    summary = evaluate(method, result.base, scored)
    return {
        "variant": job["variant"],
        "seed": job["seed"],
        "steps": result.steps,
        "best_step": result.best.get("step"),
        "train_seconds": seconds,
        "tasks": summary["tasks"],
    }


def _save_editor(result: Any, config: Any, path: Path) -> None:
    """Keep an editor for the ablations (``evaluate --no-prefix``, ``--unseen-instruction``)."""
    from kedit_vfl.artifacts import Artifact, config_to_dict, make_provenance, save_artifact
    from kedit_vfl.edit.editor.store import EDITOR_KIND, editor_extra

    extra = editor_extra(
        result.editor,
        result.base,
        result.pools,
        result.base_info,
        tasks=list(config.tasks),
        holdout=config.holdout,
        best=result.best,
        history=result.history,
    )
    provenance = make_provenance("benchmarks/edit_quality.py", config_to_dict(config), seed=config.seed)
    artifact = Artifact(EDITOR_KIND, result.editor.state_dict(), config_to_dict(config), provenance, extra)
    save_artifact(artifact, path)


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds per variant, task and metric."""
    table: dict[str, Any] = {}
    for run in runs:
        for task, values in run["tasks"].items():
            cell = table.setdefault(run["variant"], {}).setdefault(task, {})
            for key, value in values.items():
                if value is not None:
                    cell.setdefault(key, []).append(value)
    out: dict[str, Any] = {}
    for variant, tasks in table.items():
        out[variant] = {}
        for task, metrics in tasks.items():
            out[variant][task] = {
                k: {"mean": statistics.mean(v), "std": statistics.pstdev(v), "n": len(v)}
                for k, v in metrics.items()
            }
    return out


def _cell(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "-"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _markdown(title: str, aggregate: dict[str, Any], notes: list[str]) -> str:
    lines = [
        f"## {title}",
        "",
        *notes,
        "",
        "| editor | task | " + " | ".join(METRICS) + " | pre-edit R |",
        "| --- | --- | " + " | ".join("---:" for _ in METRICS) + " | ---: |",
    ]
    for variant, tasks in aggregate.items():
        for task, metrics in tasks.items():
            label = f"{task} (hold-out)" if task == HOLDOUT else task
            cells = [_cell(metrics.get(m)) for m in METRICS]
            lines.append(
                f"| {variant} | {label} | "
                + " | ".join(cells)
                + f" | {_cell(metrics.get('pre_reliability'))} |"
            )
    lines += ["", "Average Reliability over the trained tasks:", ""]
    for variant, tasks in aggregate.items():
        trained = [
            tasks[t]["reliability"]["mean"] for t in TRAIN_TASKS if t in tasks and "reliability" in tasks[t]
        ]
        if trained:
            lines.append(f"- {variant}: {statistics.mean(trained):.3f} (over {len(trained)} task(s))")
    return "\n".join(lines) + "\n"


def _run_all(jobs: list[dict[str, Any]], workers: int, log: Path) -> list[dict[str, Any]]:
    """Run the jobs; each finished run is appended to ``log`` (JSON Lines) as it completes."""
    runs = []
    log.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in as_completed([pool.submit(run_one, job) for job in jobs]):
            runs.append(future.result())
            with open(log, "a") as handle:
                handle.write(json.dumps(runs[-1]) + "\n")
    return runs


def embedded_part(seeds: list[int], steps: int, workers: int, single_seeds: list[int]) -> None:
    from kedit_vfl.edit.config import WorldOptions
    from kedit_vfl.edit.data.sources import embedded_world

    world = embedded_world(WorldOptions())
    test = {t: [r.to_dict() for r in rs] for t, rs in world.records["test"].items()}
    jobs = [
        {
            **v,
            "variant": name,
            "seed": seed,
            "model": "embedded",
            "test": test,
            "save": str(EDITORS / f"{name}_seed{seed}.safetensors")
            if not name.startswith("single_")
            else None,
        }
        for seed in seeds
        for name, v in _variants(steps).items()
        if seed in single_seeds or not name.startswith("single_")
    ]
    started = time.perf_counter()
    runs = _run_all(jobs, workers, RESULTS / "edit_quality_embedded_runs.jsonl")
    aggregate = _aggregate(runs)
    notes = [
        f"Embedded world (seed 0), editor seeds {seeds} (single-task editors: {single_seeds}), up to {steps} "
        "steps with early stopping; "
        f"test split: {', '.join(f'{t} {len(r)}' for t, r in test.items())} records. "
        "Cells: mean ± std over seeds, post-edit, one edit at a time with rollback, instruction index 0.",
        f"Wall time {time.perf_counter() - started:.0f} s with {workers} worker(s).",
    ]
    _write(
        "edit_quality_embedded",
        {"runs": runs, "aggregate": aggregate, "notes": notes},
        _markdown("Embedded world", aggregate, notes),
    )


def _real_records(per_task: int) -> dict[str, list[Any]]:
    """The first ``per_task`` records of each sample file, in upstream order."""
    from kedit_vfl.edit.data.loaders import load_records

    return {
        task: list(load_records([SHARED / name], task=task))[:per_task] for task, name in REAL_FILES.items()
    }


def real_part(
    seeds: list[int], steps: int, workers: int, pretrain_epochs: int, per_task: int, queries: str = "plain"
) -> None:
    import torch

    from kedit_vfl.edit.data.embedded import pretraining_texts
    from kedit_vfl.edit.data.loaders import true_facts
    from kedit_vfl.edit.models.pretrain import PretrainConfig, pretrain_on_facts, save_model

    torch.set_num_threads(1)
    records = _real_records(per_task)
    facts = true_facts([r for items in records.values() for r in items])
    root = Path(tempfile.mkdtemp(prefix="kvtool-real-"))
    started = time.perf_counter()
    model, tokenizer, pre = pretrain_on_facts(  # the embedded recipe: facts + instruction texts
        facts,
        pretraining_texts(),
        config=PretrainConfig(max_epochs=pretrain_epochs, n_positions=256),  # long ConvSent replies
    )
    save_model(model, tokenizer, root / "base")
    pretrain_s = time.perf_counter() - started
    train, test = [], {}
    for task, items in records.items():
        order = list(range(len(items)))
        random.Random(f"real/{task}").shuffle(order)
        n_test = len(items) if task == HOLDOUT else max(1, len(items) // 5)
        test[task] = [items[i].to_dict() for i in order[:n_test]]
        if task != HOLDOUT:
            train += [items[i] for i in order[n_test:]]
    train_file = root / "train.jsonl"
    train_file.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in train))
    base_job = {"model": str(root / "base"), "data": [str(train_file)], "test": test, "queries": queries}
    variants = {k: v for k, v in _variants(steps).items() if not k.startswith("single_")}
    jobs = [
        {**v, **base_job, "variant": name, "seed": seed} for seed in seeds for name, v in variants.items()
    ]
    runs = _run_all(jobs, workers, RESULTS / "edit_quality_real_runs.jsonl")
    aggregate = _aggregate(runs)
    notes = [
        f"Base model: GPT-2 (pretrain.py defaults) pretrained from scratch on {len(facts)} true facts of the "
        f"first {per_task} records per task of the samples in ../shared/data/edit, with the training "
        "instruction descriptions as plain texts (the embedded recipe): "
        f"{pre.accuracy:.3f} of them "
        f"exactly right after {pre.epochs} epochs "
        f"({pretrain_s:.0f} s).",
        f"Editor trained on {', '.join(TRAIN_TASKS)} ({len(train)} records, 80%; 10% of them for "
        f"validation), tested on the other 20% and on all {len(test[HOLDOUT])} ZsRE records (held out). "
        f"Seeds {seeds}. Edits scored on {queries} queries (the instructed editor's edit prompts "
        + (
            "as a user asks them, without the instruction)."
            if queries == "plain"
            else "with the instruction)."
        ),
    ]
    _write(
        "edit_quality_real",
        {"runs": runs, "aggregate": aggregate, "notes": notes, "pretrain": vars(pre)},
        _markdown("Real records (../shared/data/edit)", aggregate, notes),
    )


def _write(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("embedded", "real", "all"), default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps", type=int, default=None, help="meta-training steps (default: train-editor's)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="parallel training processes")
    parser.add_argument(
        "--single-seeds", type=int, nargs="+", default=None, help="seeds of single-task editors"
    )
    parser.add_argument("--pretrain-epochs", type=int, default=400)
    parser.add_argument(
        "--queries",
        choices=("plain", "instructed"),
        default="plain",
        help="real part: score the edits on the plain prompts a user asks, or on the instructed ones",
    )
    parser.add_argument(
        "--real-records", type=int, default=200, help="first N records per task of each sample"
    )
    args = parser.parse_args()
    from kedit_vfl.edit.config import TrainConfig

    steps = args.steps or TrainConfig.steps
    if args.part in ("embedded", "all"):
        embedded_part(args.seeds, steps, args.jobs, args.single_seeds or args.seeds)
    if args.part in ("real", "all"):
        real_part(args.seeds, steps, args.jobs, args.pretrain_epochs, args.real_records, args.queries)


if __name__ == "__main__":
    main()
