"""The training loop every stage shares: shuffled minibatches, early stopping, metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kedit_vfl.progress import SILENT, Reporter

if TYPE_CHECKING:
    from kedit_vfl.vfl.channel.party import PassiveLink
    from kedit_vfl.vfl.stages.checkpoint import TrainingState


@dataclass
class FitResult:
    """What a training run reports: best epoch, its validation metrics, throughput."""

    best_epoch: int
    epochs_run: int
    best: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    rows_per_s: float = 0.0


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """AUC and log loss; AUC is None when only one class is present.

    The AUC is exact: scores that float32 holds exactly (every caller's sigmoid outputs)
    are ranked by one sort of 64-bit keys instead of ``np.unique``'s argsort (about 4x
    faster at 8M scores), other scores take the rank path. The log loss sums float32
    terms in float64.
    """
    scores = np.asarray(probs)
    if scores.dtype == np.float32 or np.array_equal(scores.astype(np.float32), scores):
        metrics = StreamingMetrics()
        metrics.update(np.asarray(labels), scores)
        return metrics.result()
    positive = np.asarray(labels) == 1
    logloss = _log_loss_sum(positive, scores.astype(np.float32)) / len(scores)
    positives = int(positive.sum())
    negatives = len(scores) - positives
    auc = None
    if positives and negatives:  # Mann-Whitney U with tied scores sharing their mean rank
        u = average_ranks(scores.astype(np.float64))[positive].sum() - positives * (positives + 1) / 2
        auc = float(u / (positives * negatives))
    return {"auc": auc, "logloss": logloss}


class StreamingMetrics:
    """:func:`binary_metrics` of float32 scores that arrive in chunks (``score`` on a
    streamed table): each chunk's log loss and sort keys are computed as it arrives,
    so only the sort of the keys and the count are left for the end (0.25 s instead
    of 0.6 s after the last of 8M rows, measured)."""

    def __init__(self) -> None:
        self._keys: list[np.ndarray] = []
        self._loss = 0.0
        self.rows = 0  # scored rows so far

    def update(self, labels: np.ndarray, probs: np.ndarray) -> None:
        positive = np.asarray(labels) == 1
        single = np.asarray(probs).astype(np.float32, copy=False)
        self._loss += _log_loss_sum(positive, single)
        self.rows += len(single)
        self._keys.append(_order_keys(positive, single))

    def result(self) -> dict[str, float | None]:
        if not self.rows:
            return {"auc": None, "logloss": None}
        keys = np.concatenate(self._keys) if len(self._keys) > 1 else self._keys[0]
        positives = int(np.count_nonzero(keys & np.uint64(1)))
        negatives = len(keys) - positives
        auc = None
        if positives and negatives:  # Mann-Whitney U with tied scores sharing their mean rank
            keys.sort()
            auc = _u_statistic(keys) / (positives * negatives)
        return {"auc": auc, "logloss": self._loss / self.rows}


def _log_loss_sum(positive: np.ndarray, single: np.ndarray) -> float:
    likelihood = np.where(positive, single, np.float32(1) - single)
    return float(-np.log(np.clip(likelihood, np.float32(1e-7), None)).sum(dtype=np.float64))


def _order_keys(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One 64-bit key per row: the float32 score's bits mapped to an order-preserving
    unsigned integer, then the label, so equal scores sort together, negatives first."""
    bits = (scores + np.float32(0)).view(np.int32)  # + 0 turns -0.0 into +0.0
    flip = (bits >> 31) | np.int32(-(2**31))  # every bit of a negative float, the sign bit of the rest
    keys = (bits ^ flip).view(np.uint32).astype(np.uint64)
    keys <<= np.uint64(1)
    keys |= positive
    return keys


def _u_statistic(keys: np.ndarray) -> float:
    """Pairs (positive, negative) ordered right, ties counting a half, from sorted keys.

    A positive's sorted position minus the positives before it counts the negatives
    below it and those tied with it; half of the tied pairs, found in the (few) runs of
    equal scores, come off.
    """
    is_positive = (keys & np.uint64(1)).astype(bool)
    at = np.flatnonzero(is_positive)
    u = float(at.sum()) - len(at) * (len(at) - 1) / 2
    values = keys >> np.uint64(1)
    tied = np.flatnonzero(values[1:] == values[:-1])
    if len(tied):
        inside = np.zeros(len(keys), dtype=bool)
        inside[tied] = inside[tied + 1] = True
        members = np.flatnonzero(inside)  # sorted positions inside runs of equal scores
        runs = np.flatnonzero(np.concatenate(([True], values[members][1:] != values[members][:-1])))
        positives_in = np.add.reduceat(is_positive[members].astype(np.int64), runs)
        negatives_in = np.diff(np.append(runs, len(members))) - positives_in
        u -= 0.5 * float((positives_in * negatives_in).sum())
    return u


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank (scipy's ``rankdata``, without
    importing scipy.stats, which costs a second at every command's start)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def intercept_shift(logits: torch.Tensor, labels: torch.Tensor, steps: int = 40) -> float:
    """The shift ``b`` with mean(sigmoid(logits + b)) == mean(labels) (Newton's method);
    ``labels`` may be probabilities.

    Early stopping and dropout leave a network's mean prediction off the base rate;
    federated mode mixes two models' scores in one ranking, so both must be calibrated.
    """
    target, b = labels.float().mean().clamp(1e-4, 1 - 1e-4), torch.zeros(())
    for _ in range(steps):
        p = torch.sigmoid(logits.float() + b)
        gradient = (p * (1 - p)).mean().clamp_min(1e-6)
        b = b - ((p.mean() - target) / gradient).clamp(-4.0, 4.0)  # bounded steps: no overshoot
    return float(b)


def base_rate_logit(labels: torch.Tensor) -> float:
    rate = float(labels.float().mean().clamp(1e-4, 1 - 1e-4))
    return math.log(rate / (1 - rate))


def shift_bias(head: nn.Module, shift: float) -> None:
    """Add ``shift`` to the bias of a head's output layer."""
    last = head.net[-1]  # a Head: its MLP's last layer (the linear path has no bias)
    with torch.no_grad():
        last.bias += shift


class FlatAdamW:
    """AdamW (decoupled weight decay, bias-corrected moments) over all parameters as one
    flat vector: the parameters become views into it, so a step is one gradient
    concatenation and a handful of vector operations instead of a per-tensor loop.

    Small multi-network models (the split model's two towers and two heads) take many
    small steps; there ``torch.optim.AdamW``'s per-parameter bookkeeping costs more than
    the arithmetic. Parameter groups may carry their own ``lr``. A parameter without a
    gradient in a step counts as a zero gradient (its moments decay; ``torch.optim``
    would skip it).
    """

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = [p for group in groups for p in group["params"]]
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("a parameter appears twice")
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
            for p, view in zip(self.params, self.flat.split([p.numel() for p in self.params]), strict=True):
                p.data = view.view_as(p)
        self.lr = torch.cat(
            [
                torch.full((p.numel(),), float(group.get("lr", lr)), device=self.flat.device)
                for group in groups
                for p in group["params"]
            ]
        )
        self.decay = 1 - self.lr * weight_decay  # (P,) per-element shrink factor
        self.betas, self.eps, self.steps = betas, eps, 0
        self.m = torch.zeros_like(self.flat)
        self.v = torch.zeros_like(self.flat)

    def state_dict(self) -> dict:
        return {"flat": self.flat.clone(), "m": self.m.clone(), "v": self.v.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.flat.copy_(state["flat"])
            self.m.copy_(state["m"])
            self.v.copy_(state["v"])
        self.steps = int(state["steps"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grad = torch.cat(
            [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in self.params]
        )
        beta1, beta2 = self.betas
        self.steps += 1
        self.flat.mul_(self.decay)
        self.m.lerp_(grad, 1 - beta1)
        self.v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.v / (1 - beta2**self.steps)).sqrt_().add_(self.eps)
        self.flat.addcdiv_(self.m * (self.lr / (1 - beta1**self.steps)), denom, value=-1.0)


@contextmanager
def single_thread() -> Iterator[None]:
    """Train the small networks on one thread: on matrices this size, waking and syncing
    worker threads costs more than it saves, and far more on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


PREDICT_SLICE = 1 << 16  # rows per forward pass when nothing trains: bounded activations


@torch.no_grad()
def predict(fn: Callable[[slice], torch.Tensor], n: int, batch_size: int = 4096) -> torch.Tensor:
    """``fn(rows)`` over ``range(n)`` in slices; logits concatenated on the CPU.

    Slices of a few thousand rows keep these small networks' activations in cache, and
    one thread avoids waking workers for matrices this size (both measured faster).
    """
    with single_thread():
        out = [
            fn(slice(start, min(start + batch_size, n))).float().cpu() for start in range(0, n, batch_size)
        ]
    return torch.cat(out) if out else torch.zeros(0)


def loop_of(config: Any) -> dict[str, int]:
    """The loop settings every training stage takes from its config (epochs, batch, patience)."""
    return {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "patience": config.patience,
        "min_epoch_rows": config.min_epoch_rows,
    }


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | FlatAdamW,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    n_rows: int,
    evaluate: Callable[[], dict[str, float]],
    *,
    epochs: int,
    batch_size: int,
    patience: int,
    generator: torch.Generator,
    min_epoch_rows: int = 1,
    reporter: Reporter = SILENT,
    description: str = "training",
    monitor: str = "val/loss",
    peer: PassiveLink | None = None,
    state: TrainingState | None = None,
    phase: int = 0,
    select: bool = True,
) -> FitResult:
    """Minimise ``step_loss(batch_index)`` over shuffled batches; keep the best epoch.

    With ``select`` False it trains exactly ``epochs`` epochs and keeps the last
    (``evaluate`` is not called): the epoch count was chosen elsewhere
    (:mod:`kedit_vfl.vfl.stages.selection`).

    An epoch is as many whole shuffled passes as make ``min_epoch_rows`` rows.

    Before the first epoch and after each ``evaluate()`` gives validation metrics;
    training stops when ``monitor`` (lower is better) has not improved for ``patience``
    epochs and the weights of the best epoch are restored: the starting weights (epoch 0)
    compete too, so a stage that starts from a trained model (the student from the
    teacher's local branch, the self-training round) never ends worse on validation.

    With a ``peer`` (the passive party's link) its tower trains alongside: it steps after
    every batch, snapshots with every new best and restores the best at the end. With a
    ``state`` every epoch ends in a checkpoint, and a resumed run continues after the
    checkpoint's epoch exactly as the uninterrupted run would have.
    """
    loop: dict[str, Any] = {
        "epoch": 0,
        "best_value": math.inf,
        "best_epoch": 0,
        "best_metrics": {},
        "best_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "history": [],
        "rows_seen": 0,
        "train_time": 0.0,
        "stopped": False,
    }
    if peer is not None:
        peer.phase(phase)
    if state is not None:
        state.register("model", model)
        state.register("optimizer", optimizer)
        loop = state.resume(phase, like=loop) or loop
    with single_thread(), reporter.task(description, total=epochs) as task:
        task.advance(loop["epoch"])
        if select and loop["epoch"] == 0 and not loop["history"]:  # the starting weights compete as epoch 0
            model.eval()
            start_metrics = {"epoch": 0, **evaluate()}
            loop["history"].append(start_metrics)
            loop["best_value"], loop["best_metrics"] = start_metrics[monitor], start_metrics
            if peer is not None:
                peer.snapshot()
        for epoch in range(loop["epoch"] + 1, epochs + 1):
            if loop["stopped"]:
                break
            model.train()
            start, total, steps = time.perf_counter(), 0.0, 0
            passes = -(-min_epoch_rows // n_rows)  # whole shuffled passes: at least min_epoch_rows rows
            order = torch.cat([torch.randperm(n_rows, generator=generator) for _ in range(passes)])
            for index in order.split(batch_size):
                loss = step_loss(index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if peer is not None:
                    peer.step()
                total, steps = total + loss.detach(), steps + 1  # no per-step sync: one read an epoch
            loop["train_time"] += time.perf_counter() - start
            loop["rows_seen"] += len(order)
            model.eval()
            metrics = {
                "epoch": epoch,
                "train/loss": float(total) / max(steps, 1),
                **(evaluate() if select else {}),
            }
            loop["history"].append(metrics)
            loop["epoch"] = epoch
            shown = {"loss": metrics["train/loss"], "val": metrics.get(monitor)}
            task.advance(1, **{k: v for k, v in shown.items() if v is not None})
            if not select:
                loop["best_epoch"], loop["best_metrics"] = epoch, metrics
            elif metrics[monitor] < loop["best_value"] - 1e-6:
                loop["best_value"], loop["best_epoch"], loop["best_metrics"] = (
                    metrics[monitor],
                    epoch,
                    metrics,
                )
                loop["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if peer is not None:
                    peer.snapshot()
            elif epoch - loop["best_epoch"] >= patience:
                loop["stopped"] = True
            if peer is not None:
                peer.end_epoch(f"{phase}.{epoch}")
            if state is not None:
                state.save((phase, epoch), loop)
                if peer is not None:
                    peer.checkpoint((phase, epoch))
    if select:
        model.load_state_dict(loop["best_state"])
    model.eval()
    if peer is not None:
        peer.restore()
    rows_per_s = loop["rows_seen"] / max(loop["train_time"], 1e-9)
    return FitResult(loop["best_epoch"], loop["epoch"], loop["best_metrics"], loop["history"], rows_per_s)
