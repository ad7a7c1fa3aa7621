"""Teacher-forced losses and metrics on target tokens, as the editing literature computes them.

All functions take logits ``(B, T, V)`` and a :class:`TokenBatch` whose ``labels`` mark
the target (or answer) tokens; position ``t`` of the logits predicts token ``t + 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kedit_vfl.edit.config import METRICS as METRICS
from kedit_vfl.edit.models.tokens import TokenBatch, target_logprobs


def nll_sum(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Summed NLL of every target token: the editing loss whose gradient the editor sees.

    A sum (not a mean) keeps each token's gradient independent of how many edits share
    a batch, so the running statistics fit single edits and batches alike.
    """
    logp, _ = target_logprobs(logits, batch)
    return -logp.sum()


def nll_at(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of ``labels`` (B, K; -100 = none) under logits already aligned to them (B, K, V)."""
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, K, V)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, K)
    return -(picked * mask).sum()


def nll_mean(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Mean NLL per target token over the batch (the meta-training edit loss)."""
    logp, mask = target_logprobs(logits, batch)
    return -logp.sum() / mask.sum().clamp(min=1)


def _shifted(logits: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = batch.labels[:, 1:]  # (B, T-1)
    return logits[:, :-1], labels, labels != -100


def token_accuracy(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """(B,) share of each row's target tokens that are the top-1 prediction."""
    logits, labels, mask = _shifted(logits, batch)
    hits = (logits.argmax(-1) == labels) & mask  # (B, T-1)
    return hits.sum(-1).float() / mask.sum(-1).clamp(min=1).float()


def target_probability(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """(B,) probability of each row's whole target sequence."""
    logp, _ = target_logprobs(logits, batch)
    return logp.sum(-1).exp()


def unchanged_top1(pre_logits: torch.Tensor, post_logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """(B,) share of each row's answer tokens whose top-1 prediction the edit left unchanged."""
    pre, _, mask = _shifted(pre_logits, batch)
    post = post_logits[:, :-1]
    same = (pre.argmax(-1) == post.argmax(-1)) & mask  # (B, T-1)
    return same.sum(-1).float() / mask.sum(-1).clamp(min=1).float()


def kl_on_answers(pre_logits: torch.Tensor, post_logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Mean KL(pre || post) of the next-token distributions at the answer positions."""
    pre, _, mask = _shifted(pre_logits, batch)
    pre_logp = torch.log_softmax(pre.float(), dim=-1)  # (B, T-1, V)
    post_logp = torch.log_softmax(post_logits[:, :-1].float(), dim=-1)
    kl = (pre_logp.exp() * (pre_logp - post_logp)).sum(-1)  # (B, T-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def average(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over rows that have it (None where none has it)."""
    result: dict[str, float | None] = {}
    for key in [k for k in rows[0]] if rows else []:
        values = [r[key] for r in rows if r.get(key) is not None]
        result[key] = float(sum(values) / len(values)) if values else None
    return result
