"""Reliability, Generalization, Locality and Portability of an editor, pre and post edit.

Default protocol: each edit applied alone and rolled back (the edited weights only ever
exist inside a functional call, so rollback is free). ``sequential=N`` applies N edits
one after another, each computed on the already edited model, then scores all N;
``batch=N`` applies N edits together as ``apply`` does (each update computed on the
unedited model, combined as the editor's ``aggregate`` says), then scores all N.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kedit_vfl.edit.algs.base import Edited, EditMethod
from kedit_vfl.edit.algs.registry import build_method
from kedit_vfl.edit.config import EvalConfig
from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.data.sources import (
    by_task,
    embedded_world,
    read_records,
    uses_embedded_world,
    world_options_of,
)
from kedit_vfl.edit.editor.batches import Prompter, probe
from kedit_vfl.edit.editor.network import forward_with
from kedit_vfl.edit.editor.store import LoadedEditor, check_fingerprint, load_editor, open_editor_base
from kedit_vfl.edit.evaluation.metrics import METRICS, average, token_accuracy, unchanged_top1
from kedit_vfl.edit.models.base import BaseModel
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.seeding import seed_everything


def _mean(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None


@torch.no_grad()
def score_record(
    base: BaseModel, record: EditRecord, prompter: Prompter, edited: Edited
) -> dict[str, float | None]:
    """Post-edit metrics (the ``edited`` model) and pre-edit metrics (base weights) of one record."""
    p = probe(record, prompter, base.tokenizer, base.max_length)
    batch = p.batch.to(base.device)
    pre = forward_with(base.model, None, batch.model_inputs())
    post = edited.logits(base, batch)
    acc_pre, acc_post = token_accuracy(pre, batch), token_accuracy(post, batch)
    same = unchanged_top1(pre, post, batch)
    row: dict[str, float | None] = {}
    for name in METRICS:
        rows = p.rows[name]
        if name == "locality":
            row["locality"] = _mean(same[rows])
            row["pre_locality"] = 1.0 if row["locality"] is not None else None  # unchanged by definition
        else:
            row[name] = _mean(acc_post[rows])
            row["pre_" + name] = _mean(acc_pre[rows])
    return row


def evaluate_records(
    method: EditMethod,
    base: BaseModel,
    records: Sequence[EditRecord],
    sequential: int = 0,
    reporter: Reporter = SILENT,
    label: str = "evaluating edits",
    batch: int = 0,
    timer: list[float] | None = None,
    curve: list[dict[str, float | None]] | None = None,
    curve_every: int = 0,
) -> list[dict[str, float | None]]:
    """One metrics row per record, under the chosen protocol; ``timer`` collects the
    seconds spent computing updates. With ``sequential`` and ``curve``, every
    ``curve_every`` edits of a sequence the edits so far are scored on the model as it
    stands (``edits``, ``retention``: their Reliability, ``locality``: theirs)."""
    rows: list[dict[str, float | None]] = []
    chunk = max(1, sequential, batch)
    with reporter.task(label, total=len(records)) as task:
        for start in range(0, len(records), chunk):
            group = records[start : start + chunk]
            edited = method.start(base)
            began = time.perf_counter()
            spent = 0.0
            with torch.no_grad():
                if batch:  # together, as apply does: every gradient on the unedited model
                    edited = method.add(base, edited, group)
                else:  # one after another, each on the model the previous ones left
                    for done, record in enumerate(group, 1):
                        edited = method.add(base, edited, [record])
                        if curve is not None and sequential and curve_every and done % curve_every == 0:
                            paused = time.perf_counter()
                            curve.append(_retention(base, group[:done], method.queries, edited))
                            spent += time.perf_counter() - paused
            if timer is not None:
                timer.append(time.perf_counter() - began - spent)
            for record in group:
                rows.append(score_record(base, record, method.queries, edited))
                task.advance(1)
    return rows


def _retention(
    base: BaseModel, done: Sequence[EditRecord], prompter: Prompter, edited: Edited
) -> dict[str, float | None]:
    """Reliability and Locality of the edits made so far, on the model they left."""
    scored = [score_record(base, record, prompter, edited) for record in done]
    mean = average(scored)
    return {"edits": len(done), "retention": mean.get("reliability"), "locality": mean.get("locality")}


def mean_curve(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The curve over every sequence: at each number of edits, the mean over sequences."""
    by_edits: dict[int, list[Mapping[str, Any]]] = {}
    for point in points:
        by_edits.setdefault(int(point["edits"]), []).append(point)
    out = []
    for edits in sorted(by_edits):
        group = by_edits[edits]
        row: dict[str, Any] = {"edits": edits, "sequences": len(group)}
        for key in ("retention", "locality"):
            known = [g[key] for g in group if g[key] is not None]
            row[key] = sum(known) / len(known) if known else None
        out.append(row)
    return out


def summarise(rows_by_task: Mapping[str, Sequence[Mapping[str, float | None]]]) -> dict[str, Any]:
    """Per-task means with ``n_records``, and ``overall`` as the mean over tasks."""
    tasks = {task: {**average(rows), "n_records": len(rows)} for task, rows in rows_by_task.items() if rows}
    keys = [k for k in next(iter(tasks.values())) if k != "n_records"] if tasks else []
    overall: dict[str, Any] = {}
    for key in keys:
        values = [t[key] for t in tasks.values() if t[key] is not None]
        overall[key] = float(sum(values) / len(values)) if values else None
    overall["n_records"] = sum(t["n_records"] for t in tasks.values())
    return {"tasks": tasks, "overall": overall}


def evaluate(
    method: EditMethod,
    base: BaseModel,
    records_by_task: Mapping[str, Sequence[EditRecord]],
    sequential: int = 0,
    reporter: Reporter = SILENT,
    batch: int = 0,
    curve_every: int = 0,
) -> dict[str, Any]:
    """Metrics per task and overall (the mean over tasks), pre and post edit, and the
    seconds per edit spent computing updates; with ``sequential``, the retention curve
    (``sequential_curve``, every ``curve_every`` edits, by default a tenth of a sequence)."""
    timer: list[float] = []
    points: list[dict[str, float | None]] = []
    every = curve_every or max(1, sequential // 10)
    rows = {
        task: evaluate_records(
            method,
            base,
            records,
            sequential,
            reporter,
            f"{method.name}: {task}",
            batch,
            timer,
            points if sequential else None,
            every,
        )  # fmt: skip
        for task, records in records_by_task.items()
    }
    summary = summarise(rows)
    edits = summary["overall"]["n_records"]
    summary["seconds_per_edit"] = sum(timer) / edits if edits else None
    if sequential:
        summary["sequential_curve"] = mean_curve(points)
    return summary


def evaluation_records(
    config: EvalConfig, loaded: LoadedEditor, reporter: Reporter = SILENT
) -> dict[str, list[EditRecord]]:
    """``--data`` records, or the embedded world's test split of every task (hold-out included)."""
    if config.data:
        grouped = by_task(read_records(config.data))
    elif uses_embedded_world(config.model or loaded.base.get("model")):
        grouped = {
            t: list(r)
            for t, r in embedded_world(world_options_of(loaded.base), reporter).records["test"].items()
        }
    else:
        raise UserError(
            "--data: name the records to evaluate on (the embedded ones fit only the embedded model)"
        )
    if config.task is not None:
        if config.task not in grouped:
            raise UserError(
                f"--task {config.task}: no such task in the data (it has {', '.join(sorted(grouped))})"
            )
        grouped = {config.task: grouped[config.task]}
    return {t: r[: config.limit] if config.limit else r for t, r in grouped.items() if r}


def trained_queries(loaded: LoadedEditor) -> str:
    """The prompts an editor's edit loss was trained on: plain, or (before 0.2, or with
    ``--instructed-queries``) the instructed ones."""
    return "instructed" if loaded.artifact.config.get("instructed_queries", True) else "plain"


def evaluate_editor(
    editor_path: str | Path, config: EvalConfig, reporter: Reporter = SILENT
) -> dict[str, Any]:
    """``kvtool edit evaluate``: metrics per task and overall for each ``--method``.

    The first method's figures are the top level (as a single method reports them);
    ``methods`` holds every method's, and ``comparison`` one overall row per method.
    """
    loaded = load_editor(editor_path)
    plain = load_editor(config.mend_editor) if config.mend_editor else None
    pools = None if config.no_prefix else loaded.pools
    prompter = Prompter(pools, index=config.instruction_index, unseen=config.unseen_instruction)
    asked = trained_queries(loaded) if config.queries == "auto" else config.queries
    queries = Prompter(None) if asked == "plain" else prompter
    # every method's options are checked before the (slow) base model is opened
    chosen = {
        name: build_method(name, loaded, prompter, plain, config.hparams, queries) for name in config.methods
    }
    base = open_editor_base(loaded, config.model, config.device, config.dtype, str(editor_path), reporter)
    if plain is not None:
        check_fingerprint(plain, base, config.mend_editor)
        plain.editor.to(base.device).eval()
    records = evaluation_records(config, loaded, reporter)
    methods = {}
    for name, method in chosen.items():
        seed_everything(config.seed)
        methods[name] = evaluate(
            method, base, records, config.sequential, reporter, config.batch, config.curve_every
        )
    if config.plot is not None and config.sequential:
        from kedit_vfl.edit.evaluation.plots import retention_curves

        retention_curves(
            {n: m["sequential_curve"] for n, m in methods.items()}, config.sequential, config.plot
        )
    first = methods[config.methods[0]]
    return {
        **first,
        "method": config.methods[0],
        "methods": methods,
        "comparison": [comparison_row(name, result) for name, result in methods.items()],
        "holdout": loaded.artifact.extra.get("holdout"),
        "trained_tasks": loaded.artifact.extra.get("tasks"),
        "instructions": loaded.pools is not None,
        "protocol": {
            "sequential": config.sequential,
            "batch": config.batch,
            "instruction_index": config.instruction_index,
            "unseen_instruction": config.unseen_instruction,
            "no_prefix": config.no_prefix,
            "queries": asked,
        },
    }


def comparison_row(name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """One method's overall figures, and the mean of Reliability, Generalization, Locality."""
    overall = result["overall"]
    parts = [overall.get(k) for k in ("reliability", "generalization", "locality")]
    known = [p for p in parts if p is not None]
    return {
        "method": name,
        "reliability": overall.get("reliability"),
        "generalization": overall.get("generalization"),
        "locality": overall.get("locality"),
        "mean_rgl": sum(known) / len(known) if known else None,
        "seconds_per_edit": result.get("seconds_per_edit"),
    }
