"""What the editor reads for a batch of edits: the prompts it differentiates and, for an
editor with ``instruction_input="condition"``, one instruction embedding per edit.

An editor conditioned on instructions differentiates the plain prompt a user asks after
``apply``; the task instruction enters as the base model's mean final hidden state over
the instruction's tokens, which scales and shifts the editor's features
(:class:`~kedit_vfl.edit.editor.network.GradientTransform`). A prefixed editor reads the
gradient of the instruction-prefixed prompt, as InstructEdit does.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.editor.batches import Prompter, edit_batch
from kedit_vfl.edit.editor.network import Editor
from kedit_vfl.edit.models.base import BaseModel
from kedit_vfl.edit.models.tokens import TokenBatch

_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def conditioned(editor: Editor) -> bool:
    return editor.config.instruction_input == "condition" and editor.config.condition_dim > 0


@torch.no_grad()
def instruction_embeddings(base: BaseModel, texts: Sequence[str | None]) -> torch.Tensor:
    """(n, hidden) float32: each text's mean final hidden state (zeros for None), cached per model."""
    cache = _CACHE.setdefault(base.model, {})
    missing = sorted({t for t in texts if t is not None and t not in cache})
    for start in range(0, len(missing), 32):
        group = missing[start : start + 32]
        encoded = [base.tokenizer(t, add_special_tokens=True)["input_ids"][: base.max_length] for t in group]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(group), width), int(base.tokenizer.pad_token_id or 0), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        ids, mask = ids.to(base.device), mask.to(base.device)
        hidden = base.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = ((hidden * weights).sum(1) / weights.sum(1).clamp_min(1)).float()  # no tokens: zeros
        for text, vector in zip(group, pooled, strict=True):
            cache[text] = vector
    width = int(base.model.config.hidden_size)
    zeros = torch.zeros(width, device=base.device)
    return torch.stack([cache[t] if t is not None else zeros for t in texts])


def editor_batch(
    editor: Editor, base: BaseModel, records: Sequence[EditRecord], prompter: Prompter
) -> tuple[TokenBatch, torch.Tensor | None]:
    """The batch whose gradients the editor reads, and its per-edit conditions (or None)."""
    if not conditioned(editor):
        return edit_batch(records, prompter, base.tokenizer, base.max_length).to(base.device), None
    batch = edit_batch(records, Prompter(None), base.tokenizer, base.max_length).to(base.device)
    return batch, instruction_embeddings(base, [prompter.description(r.task) for r in records])
