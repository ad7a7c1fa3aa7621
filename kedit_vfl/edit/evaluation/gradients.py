"""``analyze-gradients``: collect an editor's update for each edit and measure task separation.

For every record the editor turns the captured gradient factors into per-layer weight
updates (exactly as ``apply`` would); each update is reduced at once to a fixed-size
vector (exact flattening when the edited layers are small, a Kronecker random
projection otherwise, see :mod:`kedit_vfl.edit.evaluation.analysis`), so memory is bounded by the
representation size, not by the model size times the number of records.

Panels compared: one editor with and without its instruction prefix, or two editors side
by side (``--compare``), always on the same records.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kedit_vfl.artifacts import atomic_write, config_to_dict
from kedit_vfl.edit.algs.hypernetwork import compute_update
from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.data.sources import (
    by_task,
    embedded_world,
    read_records,
    uses_embedded_world,
    world_options_of,
)
from kedit_vfl.edit.editor.batches import Prompter
from kedit_vfl.edit.editor.store import LoadedEditor, check_fingerprint, load_editor, open_editor_base
from kedit_vfl.edit.evaluation.analysis import UpdateSketch, separation_report
from kedit_vfl.edit.evaluation.plots import scatter_panels
from kedit_vfl.edit.models.base import BaseModel
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.seeding import seed_everything

MIN_RECORDS_PER_TASK = 3


@dataclass(frozen=True)
class AnalyzeConfig:
    """One field per ``analyze-gradients`` option."""

    editor: str
    out: str
    compare: str | None = None
    data: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    per_task: int = 100
    exact_limit: int = 65_536  # flatten updates exactly up to this many entries in all
    sketch_dim: int = 4_096  # otherwise project to about this many dimensions
    model: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    instruction_index: int = 0
    seed: int = 0
    labels: tuple[str, ...] = field(default=())  # panel names, optional

    def __post_init__(self) -> None:
        if self.per_task < MIN_RECORDS_PER_TASK:
            raise UserError(f"--per-task {self.per_task}: must be at least {MIN_RECORDS_PER_TASK}")
        if self.sketch_dim < 4:
            raise UserError(f"--sketch-dim {self.sketch_dim}: must be at least 4")


class UpdateEncoder:
    """Turns one edit's per-layer updates into a fixed-size vector."""

    def __init__(self, shapes: dict[str, tuple[int, int]], exact_limit: int, sketch_dim: int, seed: int):
        total = sum(a * b for a, b in shapes.values())
        self.names = sorted(shapes)
        self.exact = total <= exact_limit
        self.k = max(2, int(math.sqrt(sketch_dim / max(1, len(shapes)))))
        self.sketches = (
            {}
            if self.exact
            else {
                name: UpdateSketch.create(*shapes[name], k=self.k, seed=seed + i)
                for i, name in enumerate(self.names)
            }
        )
        self.size = total if self.exact else sum(s.size for s in self.sketches.values())

    def describe(self) -> dict[str, Any]:
        if self.exact:
            return {"kind": "exact", "size": self.size, "note": "flattened per-layer updates, concatenated"}
        return {
            "kind": "kronecker-random-projection",
            "size": self.size,
            "k_per_side": self.k,
            "note": "vec(P_out^T dW P_in) per layer, fixed Gaussian P (inner products kept in expectation)",
        }

    def __call__(self, updates: dict[str, torch.Tensor]) -> np.ndarray:
        parts = []
        for name in self.names:
            update = updates[name].detach().float()
            if self.exact:
                parts.append(update.reshape(-1))
            else:
                sketch = self.sketches[name]
                parts.append((sketch.p_out.T @ update.cpu() @ sketch.p_in).reshape(-1))  # (k_out * k_in,)
        return torch.cat(parts).cpu().numpy()


def _update_shapes(base: BaseModel, loaded: LoadedEditor) -> dict[str, tuple[int, int]]:
    params = dict(base.model.named_parameters())
    return {t.param: tuple(params[t.param].shape) for t in loaded.editor.targets}  # type: ignore[misc]


def analysis_records(config: AnalyzeConfig, loaded: LoadedEditor) -> dict[str, list[EditRecord]]:
    """``--data`` or the embedded world's test (then validation) records, N per task."""
    if config.data:
        grouped = by_task(read_records(config.data))
    elif uses_embedded_world(config.model or loaded.base.get("model")):
        # Test records first, then validation and train ones to reach N per task: the
        # analysis looks at update directions, not at how well the edits generalise.
        world = embedded_world(world_options_of(loaded.base))
        grouped = {
            task: [r for split in ("test", "validation", "train") for r in world.records[split].get(task, [])]
            for task in world.records["test"]
        }
    else:
        raise UserError("--data: name the records to analyse (the embedded ones fit only the embedded model)")
    if config.tasks:
        unknown = [t for t in config.tasks if t not in grouped]
        if unknown:
            raise UserError(
                f"--tasks: no records of {', '.join(unknown)} (the data has {', '.join(sorted(grouped))})"
            )
        grouped = {t: grouped[t] for t in config.tasks}
    if len(grouped) < 2:
        raise UserError(
            f"the data has records of {len(grouped)} task(s) ({', '.join(grouped) or 'none'}): "
            "task separation needs records labelled with at least 2 tasks"
        )
    for task, records in grouped.items():
        if len(records) < MIN_RECORDS_PER_TASK:
            raise UserError(
                f"task '{task}' has {len(records)} record(s); the analysis needs at least "
                f"{MIN_RECORDS_PER_TASK} per task"
            )
    return {task: records[: config.per_task] for task, records in sorted(grouped.items())}


def collect_updates(
    loaded: LoadedEditor,
    base: BaseModel,
    records: dict[str, list[EditRecord]],
    prompter: Prompter,
    encoder: UpdateEncoder,
    reporter: Reporter,
    label: str,
) -> np.ndarray:
    """One representation row per record (edits one at a time, nothing kept but the row)."""
    rows = []
    total = sum(len(r) for r in records.values())
    with reporter.task(f"updates: {label}", total=total) as task, torch.no_grad():
        for task_records in records.values():
            for record in task_records:
                rows.append(encoder(compute_update(loaded.editor, base, [record], prompter)))
                task.advance(1)
    return np.stack(rows)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the output folder ({exc.strerror})") from exc
    if not os.access(out, os.W_OK):
        raise UserError(f"{out}: the output folder is not writable")


def _holdout_of(loaded: LoadedEditor, tasks: list[str]) -> str | None:
    trained = loaded.artifact.extra.get("tasks") or []
    holdout = loaded.artifact.extra.get("holdout")
    if holdout in tasks:
        return holdout
    unseen = [t for t in tasks if trained and t not in trained]
    return unseen[0] if unseen else None


def analyze_gradients(config: AnalyzeConfig, reporter: Reporter = SILENT) -> dict[str, Any]:
    """Updates per record for each panel, PCA and separation numbers, ``analysis.json`` and PNG."""
    out = Path(config.out)
    _check_writable(out)
    seed_everything(config.seed)
    loaded = load_editor(config.editor)
    base = open_editor_base(loaded, config.model, config.device, config.dtype, config.editor, reporter)
    records = analysis_records(config, loaded)
    labels = [task for task, items in records.items() for _ in items]
    encoder = UpdateEncoder(_update_shapes(base, loaded), config.exact_limit, config.sketch_dim, config.seed)

    panels: list[tuple[str, LoadedEditor, Prompter]] = []
    if config.compare:
        other = load_editor(config.compare)
        check_fingerprint(other, base, f"--compare {config.compare}")  # against the weights loaded
        other.editor.to(base.device).eval()
        panels.append(
            (_name(config.editor, loaded), loaded, Prompter(loaded.pools, index=config.instruction_index))
        )
        panels.append(
            (_name(config.compare, other), other, Prompter(other.pools, index=config.instruction_index))
        )
        mode = "two editors"
    elif loaded.pools is not None:
        panels.append(("with instructions", loaded, Prompter(loaded.pools, index=config.instruction_index)))
        panels.append(("without instruction prefix", loaded, Prompter(None)))
        mode = "one editor, with and without the instruction prefix"
    else:
        panels.append((_name(config.editor, loaded), loaded, Prompter(None)))
        mode = "one editor trained without instructions"

    holdout = _holdout_of(loaded, list(records))
    results = []
    for name, editor, prompter in panels:
        features = collect_updates(editor, base, records, prompter, encoder, reporter, name)
        results.append(
            {"name": name, **separation_report(features, labels, holdout=holdout, seed=config.seed)}
        )

    analysis = {
        "mode": mode,
        "settings": config_to_dict(config),
        "representation": encoder.describe(),
        "tasks": {task: len(items) for task, items in records.items()},
        "holdout_task": holdout,
        "trained_tasks": loaded.artifact.extra.get("tasks"),
        "labels": labels,
        "panels": results,
        "files": {"json": str(out / "analysis.json"), "png": str(out / "gradients.png")},
    }
    scatter_panels(results, labels, holdout, out / "gradients.png")
    atomic_write(out / "analysis.json", lambda tmp: tmp.write_text(json.dumps(analysis, indent=2) + "\n"))
    return analysis


def _name(path: str, loaded: LoadedEditor) -> str:
    kind = "instructions" if loaded.pools is not None else "no instructions"
    return f"{Path(path).stem} ({kind})"
