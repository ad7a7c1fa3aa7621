"""Tokenising prompt + target pairs for teacher-forced editing losses and metrics.

The prompt and the target are tokenised *together* and the target's positions are
found from character offsets. Tokenising the target alone misaligns tokens on
LLaMA-style tokenizers (a leading-space piece differs from a word-initial piece).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kedit_vfl.errors import UserError


@dataclass
class TokenBatch:
    """A right-padded batch; ``labels`` is -100 everywhere except on target tokens."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def predict_mask(self) -> torch.Tensor:
        """(B, T) True at positions whose logits predict a target token (labels shifted left)."""
        mask = torch.zeros_like(self.labels, dtype=torch.bool)
        mask[:, :-1] = self.labels[:, 1:] != -100
        return mask

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def join(prompt: str, target: str) -> str:
    """``prompt + ' ' + target`` unless one side already carries the space."""
    if not prompt or prompt[-1].isspace() or target[:1].isspace():
        return prompt + target
    return prompt + " " + target


def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], max_length: int, where: str = "record"
) -> TokenBatch:
    """Tokenise each ``prompt + target`` once; mark the target tokens in ``labels``.

    A target token is one whose characters start at or after the target's first
    character. Raises a UserError naming ``where`` for an empty target or a pair longer
    than the model's context.
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    texts, starts = [], []
    for prompt, target in zip(prompts, targets, strict=False):
        if not target.strip():
            raise UserError(f"{where}: empty target for prompt {prompt!r}")
        text = join(prompt, target)
        texts.append(text)
        starts.append(len(text) - len(target.lstrip()))  # first character of the target
    encoded = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
    rows_ids, rows_labels = [], []
    for text, start, ids, offsets in zip(
        texts, starts, encoded["input_ids"], encoded["offset_mapping"], strict=False
    ):
        if len(ids) > max_length:
            raise UserError(
                f"{where}: prompt + target is {len(ids)} tokens, longer than the model's context "
                f"({max_length}): {text[:60]!r}"
            )
        labels = [
            tok if (end > start and end > begin) else -100
            for tok, (begin, end) in zip(ids, offsets, strict=False)
        ]
        if all(label == -100 for label in labels):
            raise UserError(f"{where}: the target of {text[:60]!r} produced no tokens")
        if labels[0] != -100:
            raise UserError(f"{where}: the prompt of {text[:60]!r} produced no tokens before the target")
        rows_ids.append(ids)
        rows_labels.append(labels)
    return _pad(rows_ids, rows_labels, tokenizer.pad_token_id)


def _pad(rows_ids: list[list[int]], rows_labels: list[list[int]], pad_id: int) -> TokenBatch:
    width = max(len(r) for r in rows_ids)
    ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows_ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows_ids, rows_labels, strict=False)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(row)] = 1
    return TokenBatch(ids, mask, labels)


def target_logprobs(logits: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-probability of the label and the predict mask, both (B, T-1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    labels = batch.labels[:, 1:]  # (B, T-1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return picked * mask, mask
