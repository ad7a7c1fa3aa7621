"""A cross-validated, L2-regularised logistic regression on fixed features, with an offset.

The federated head's starting point. With few labelled overlapped rows, a network's
early stopping on tens of validation rows picks noise, while a convex, regularised
linear model with its strength chosen by k-fold cross-validation holds (it is what a
scaled logistic regression on the pooled rows gets right). Here it is fitted on the
two towers' embeddings, ``[h_A, h_B]``, on top of the local branch's logit (the
offset), so it learns what the publisher's rows add; the federated head starts as this
linear model and training goes on from it only where validation says it helps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kedit_vfl.vfl.stages.selection import FOLDS, stratified_folds

LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # per-row L2 strengths tried, on standardised features
MAX_ROWS = 200_000  # rows the probe fits on at most (a seeded sample beyond): it is a starting point


@dataclass(frozen=True)
class Probe:
    """``logit = offset + features @ weight + bias`` (on the raw features), and how it was chosen."""

    weight: torch.Tensor  # (d,)
    bias: float
    strength: float  # the chosen L2 strength
    cv_loss: float  # its mean out-of-fold log loss
    offset_loss: float  # the out-of-fold log loss of the offset alone (no probe)


def fit_logistic(
    x: torch.Tensor, offset: torch.Tensor, y: torch.Tensor, strength: float, iterations: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias minimising mean BCE(offset + x w + b) + strength/2 |w|^2 (L-BFGS)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    x, offset, y = x.double(), offset.double(), y.double()
    optimizer = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(offset + x @ w + b, y) + 0.5 * strength * (w @ w)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def linear_probe(
    features: torch.Tensor, offset: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> Probe | None:
    """The probe with its L2 strength chosen by k-fold cross-validation; None when the rows
    hold too few of either class to cross-validate (fewer than ``FOLDS`` each)."""
    positives = int(labels.sum())
    if min(positives, len(labels) - positives) < FOLDS:
        return None
    if len(labels) > MAX_ROWS:
        keep = torch.randperm(len(labels), generator=generator)[:MAX_ROWS]
        features, offset, labels = features[keep], offset[keep], labels[keep]
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    fold = stratified_folds(labels, generator)
    losses = {strength: 0.0 for strength in LAMBDAS}
    offset_loss = 0.0
    for k in range(FOLDS):
        train, held = fold != k, fold == k
        offset_loss += F.binary_cross_entropy_with_logits(
            offset[held].double(), labels[held].double(), reduction="sum"
        ).item()
        for strength in LAMBDAS:
            w, b = fit_logistic(x[train], offset[train], labels[train], strength)
            logit = offset[held].double() + x[held].double() @ w + b
            losses[strength] += F.binary_cross_entropy_with_logits(
                logit, labels[held].double(), reduction="sum"
            ).item()
    best = min(LAMBDAS, key=lambda s: (losses[s], -s))  # ties: the stronger regulariser
    w, b = fit_logistic(x, offset, labels, best)
    weight = (w / std.double()).float()  # back to the raw features
    bias = float(b - (w * mean.double() / std.double()).sum())
    n = len(labels)
    return Probe(weight, bias, best, losses[best] / n, offset_loss / n)
