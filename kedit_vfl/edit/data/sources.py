"""Where base models and edit records come from: the embedded world or the user's files."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kedit_vfl.edit.config import EditorConfig, WorldOptions
from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.models.base import BaseModel, load_base_model, load_random_model
from kedit_vfl.edit.models.random_weights import is_random_spec
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter

EMBEDDED = "embedded"


def embedded_world(options: WorldOptions, reporter: Reporter = SILENT) -> Any:
    """The embedded world (built and cached on first use) for these seed and sizes."""
    from kedit_vfl.edit.data.embedded import WorldConfig, load_embedded_world

    return load_embedded_world(WorldConfig(**options.as_kwargs()), reporter=reporter)


def open_base(
    model: str,
    world: WorldOptions,
    device: torch.device,
    dtype: str,
    editor: EditorConfig,
    reporter: Reporter = SILENT,
) -> tuple[BaseModel, dict[str, Any]]:
    """The base model and how to find it again (stored in the editor artifact).

    A ``random:`` spec (models.random_weights) is built with the embedded world's
    tokenizer, so the world's records train and evaluate an editor for it.
    """
    if is_random_spec(model):
        built = embedded_world(world, reporter)
        base = load_random_model(
            model, str(built.model_dir), device, dtype, editor.layers, editor.n_blocks, reporter
        )
        info = {"model": model, "world": {"seed": world.seed, "sizes": dict(world.sizes)}}
        return base, {**info, "dtype": dtype}
    if model == EMBEDDED:
        built = embedded_world(world, reporter)
        source = str(built.model_dir)
        info: dict[str, Any] = {
            "model": EMBEDDED,
            "world": {"seed": world.seed, "sizes": dict(world.sizes), "hash": built.manifest.get("hash")},
        }
    else:
        source, info = model, {"model": model}
    base = load_base_model(source, device, dtype, editor.layers, editor.n_blocks, reporter)
    base.source = model if model != EMBEDDED else f"embedded (world seed {world.seed})"
    return base, {**info, "dtype": dtype}


def uses_embedded_world(model: str | None) -> bool:
    """The embedded model and ``random:`` models run on the embedded world's records by default."""
    return model == EMBEDDED or (model is not None and is_random_spec(model))


def world_options_of(base_info: dict[str, Any]) -> WorldOptions:
    world = base_info.get("world") or {}
    return WorldOptions(
        seed=int(world.get("seed", 0)), sizes=tuple(sorted((world.get("sizes") or {}).items()))
    )


def by_task(records: Sequence[EditRecord]) -> dict[str, list[EditRecord]]:
    grouped: dict[str, list[EditRecord]] = {}
    for record in records:
        grouped.setdefault(record.task, []).append(record)
    return grouped


def interleaved(groups: Sequence[Sequence[EditRecord]]) -> list[EditRecord]:
    """One record of each group in turn until all are used (a batch or sequence mixing tasks)."""
    queues = [list(group) for group in groups]
    out: list[EditRecord] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        out.extend(q[depth] for q in queues if depth < len(q))
    return out


def read_records(paths: Sequence[str | Path], task: str | None = None) -> list[EditRecord]:
    """Records from files in any supported format (auto-detected)."""
    from kedit_vfl.edit.data.loaders import load_records

    for path in paths:
        if not Path(path).exists():
            raise UserError(f"{path}: no such file")
    records = load_records([Path(p) for p in paths], task=task)
    if not records:
        raise UserError(f"{', '.join(map(str, paths))}: no edit records found")
    return list(records)


def split_validation(
    records: dict[str, list[EditRecord]], fraction: float, seed: int
) -> tuple[dict[str, list[EditRecord]], dict[str, list[EditRecord]]]:
    """A seeded random validation share per task (never the tail of the training data)."""
    train, val = {}, {}
    for task, items in records.items():
        order = list(range(len(items)))
        random.Random(f"{seed}/{task}").shuffle(order)
        n_val = max(1, round(len(items) * fraction)) if len(items) > 1 else 0
        val[task] = [items[i] for i in order[:n_val]]
        train[task] = [items[i] for i in order[n_val:]]
    return train, val
