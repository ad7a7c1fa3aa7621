"""Choosing how long to train when the validation rows are too few to choose with.

Early stopping on a held-out part of the labelled rows works when that part holds
enough of each class. With a few hundred labelled rows it holds a handful of
positives, and the chosen epoch is noise (or, with none, the epoch that pushed every
score down). Then the number of epochs is chosen by k-fold cross-validation over every
labelled row instead, and the model trains on all of them for that many epochs. Only
for stages the active party runs alone (the local branch, ``train-local``, the
student): folds cost nothing but local compute there, and the data are small exactly
when this path is taken.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from kedit_vfl.vfl.stages.train import FitResult, fit

MIN_VALIDATION_CLASS_ROWS = 10  # of each class, for early stopping on a hold-out to be trusted
FOLDS = 5


def too_few_to_select(labels: torch.Tensor, what: str = "labelled validation rows") -> str | None:
    """Why ``labels`` (of validation rows) cannot choose an epoch, or None if they can."""
    positives = int((labels == 1).sum())
    negatives = int((labels == 0).sum())
    if min(positives, negatives) >= MIN_VALIDATION_CLASS_ROWS:
        return None
    return f"{positives} positive and {negatives} negative {what}"


def stratified_folds(labels: torch.Tensor, generator: torch.Generator, folds: int = FOLDS) -> torch.Tensor:
    """A fold index per row, each class dealt round-robin in a seeded order."""
    fold = torch.empty(len(labels), dtype=torch.long)
    for value in (0.0, 1.0):
        rows = torch.nonzero(labels == value).squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=generator)]
        fold[rows] = torch.arange(len(rows)) % folds
    return fold


def fit_cross_validated(
    model: nn.Module,
    make_optimizer: Callable[[], torch.optim.Optimizer],
    rows_loss: Callable[[torch.Tensor], torch.Tensor],
    rows_val_loss: Callable[[torch.Tensor], float],
    labelled: torch.Tensor,
    labels: torch.Tensor,
    *,
    always: torch.Tensor | None = None,
    epochs: int,
    batch_size: int,
    patience: int,
    min_epoch_rows: int,
    generator: torch.Generator,
) -> FitResult:
    """Choose the epoch count by k-fold cross-validation over ``labelled`` rows (with
    ``always`` rows in every fold's training), then train on all of them that long.

    ``rows_loss(rows)`` is the training loss of a batch of rows, ``rows_val_loss(rows)``
    the validation loss of held-out rows. Each fold starts from the model's current
    weights and stops early on its own fold; the fold curves (epoch 0 included) are
    averaged, a stopped fold counting its last value for the epochs it skipped. The
    returned result's ``best_epoch`` is the chosen count and ``best`` holds the mean
    out-of-fold loss there.
    """
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fold = stratified_folds(labels, generator)
    extra = always if always is not None else labelled[:0]
    curves = []
    for k in range(FOLDS):
        model.load_state_dict(start)
        train = torch.cat([extra, labelled[fold != k]])
        held = labelled[fold == k]
        result = fit(
            model,
            make_optimizer(),
            lambda index, train=train: rows_loss(train[index]),
            len(train),
            lambda held=held: {"val/loss": rows_val_loss(held)},
            epochs=epochs,
            batch_size=batch_size,
            patience=patience,
            min_epoch_rows=min_epoch_rows,
            generator=generator,
        )
        curves.append([h["val/loss"] for h in result.history])
    longest = max(len(c) for c in curves)
    mean = np.mean([c + [c[-1]] * (longest - len(c)) for c in curves], axis=0)
    chosen = int(np.argmin(mean))
    model.load_state_dict(start)
    train = torch.cat([extra, labelled])
    final = (
        fit(
            model,
            make_optimizer(),
            lambda index: rows_loss(train[index]),
            len(train),
            lambda: {},
            epochs=chosen,
            batch_size=batch_size,
            patience=patience,
            min_epoch_rows=min_epoch_rows,
            generator=generator,
            select=False,
        )
        if chosen
        else None
    )
    rows_per_s = final.rows_per_s if final is not None else 0.0
    return FitResult(chosen, chosen, {"cv/loss": float(mean[chosen]), "cv/folds": FOLDS}, [], rows_per_s)
