"""``kvtool edit apply``: edit a base model with a trained editor and save it.

All edits of one call are one batched edit: each edit's gradient is taken on the
unedited model and the editor combines them all at once (jointly since 0.3, summed for
older editors; batches of ``--batch-size`` only bound memory). The
edited model is written as a Hugging Face folder (safetensors) that ``transformers``
loads directly, with a report of each edit's target probability and accuracy before and
after.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit_vfl.edit.algs.hypernetwork import compute_update
from kedit_vfl.edit.config import ApplyConfig
from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.data.sources import (
    embedded_world,
    read_records,
    uses_embedded_world,
    world_options_of,
)
from kedit_vfl.edit.editor.batches import Prompter, edit_batch
from kedit_vfl.edit.editor.network import Editor, apply_updates_, edited_params, forward_with
from kedit_vfl.edit.editor.store import load_editor, open_editor_base
from kedit_vfl.edit.evaluation.evaluate import trained_queries
from kedit_vfl.edit.evaluation.metrics import target_probability, token_accuracy
from kedit_vfl.edit.models.base import BaseModel, save_model_folder
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter

REPORT_NAME = "kvtool_edits.json"


@dataclass
class ApplyResult:
    out: Path
    edits: list[dict[str, Any]]
    edit_seconds: float  # the editing step only (model load and save excluded)


@torch.no_grad()
def target_scores(
    base: BaseModel, records: Sequence[EditRecord], prompter: Prompter, params: dict[str, torch.Tensor] | None
) -> tuple[list[float], list[float]]:
    """Probability and token accuracy of each record's new target on its (instructed) prompt."""
    probs, accs = [], []
    for start in range(0, len(records), 32):
        batch = edit_batch(records[start : start + 32], prompter, base.tokenizer, base.max_length).to(
            base.device
        )
        logits = forward_with(base.model, params, batch.model_inputs())
        probs.extend(target_probability(logits, batch).tolist())
        accs.extend(token_accuracy(logits, batch).tolist())
    return probs, accs


def edit_updates(
    editor: Editor, base: BaseModel, records: Sequence[EditRecord], prompter: Prompter, batch_size: int
) -> dict[str, torch.Tensor]:
    """One update for all edits, each edit's gradient taken on the unedited model and the
    editor combining them together (``EditorConfig.aggregate``).

    ``batch_size`` bounds how many edits share a forward pass (memory, speed), never the
    result. Computing each batch on the model the previous batches left made nearly every
    edit fail in our measurements (docs/benchmarks.md, editing): one update can move an
    MLP output weight by most of its own norm, and the next edit's gradients on that
    model fall outside the statistics the editor normalises with.
    """
    return compute_update(editor, base, records, prompter, chunk=batch_size)


def holds(acc_post: float) -> bool:
    """An edit holds when every token of its new target is the top-1 prediction after it."""
    return acc_post >= 1.0


def _save_model(base: BaseModel, out: Path, report: dict[str, Any], overwrite: bool) -> None:
    save_model_folder(base, out, overwrite, {REPORT_NAME: json.dumps(report, indent=2)})


def apply_edits(editor_path: str | Path, config: ApplyConfig, reporter: Reporter = SILENT) -> ApplyResult:
    """Apply the edits of ``config.edits`` (or the embedded test requests) and save the model."""
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    loaded = load_editor(editor_path)
    base = open_editor_base(loaded, config.model, config.device, config.dtype, str(editor_path), reporter)
    if config.edits:
        records = read_records(config.edits)
    elif uses_embedded_world(config.model or loaded.base.get("model")):
        # The demo requests: the first test edit of each task (an editor trained one edit
        # per step handles a few edits at once, not a whole split; see the README).
        world = embedded_world(world_options_of(loaded.base), reporter)
        records = [items[0] for items in world.records["test"].values() if items]
    else:
        raise UserError(
            "--edits: name a file of edit requests (the embedded ones fit only the embedded model)"
        )
    prompter = Prompter(loaded.pools, index=config.instruction_index)
    # an edit holds when the prompt is asked as the editor was trained to serve it
    asked = Prompter(None) if trained_queries(loaded) == "plain" else prompter
    pre_probs, pre_accs = target_scores(base, records, asked, None)
    reporter.log(f"applying {len(records)} edits in batches of {config.batch_size}")
    started = time.perf_counter()
    updates = edit_updates(loaded.editor, base, records, prompter, config.batch_size)
    if base.device.type == "cuda":
        torch.cuda.synchronize()
    edit_seconds = time.perf_counter() - started
    post_probs, post_accs = target_scores(base, records, asked, edited_params(base.model, updates))
    edits = [
        {
            "task": r.task,
            "prompt": r.prompt,
            "target_new": r.target_new,
            "p_pre": pp,
            "p_post": qp,
            "acc_pre": pa,
            "acc_post": qa,
            "held": holds(qa),
        }
        for r, pp, qp, pa, qa in zip(records, pre_probs, post_probs, pre_accs, post_accs, strict=False)
    ]
    failed = sum(not e["held"] for e in edits)
    if failed:
        sizes = loaded.artifact.config.get("batch_sizes") or [loaded.artifact.config.get("batch_size", 1)]
        reporter.warn(
            f"{failed} of {len(edits)} edits do not hold (new target not top-1 on every token); "
            f"the editor was meta-trained on {'/'.join(map(str, sizes))} edit(s) per step and edits "
            "in one update interfere as they are added (train-editor --batch-sizes helps; 'kvtool "
            "edit evaluate --method memory' keeps many edits apart; docs/benchmarks.md has the figures)"
        )
    apply_updates_(base.model, updates)
    report = {
        "editor": str(editor_path),
        "editor_sha256": loaded.artifact.sha256,
        "base": loaded.base,
        "n_edits": len(edits),
        "batch_size": config.batch_size,
        "edits": edits,
    }
    _save_model(base, out, report, config.overwrite)
    return ApplyResult(out, edits, edit_seconds)
