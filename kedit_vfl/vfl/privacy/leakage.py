"""What the passive party could learn about the labels from the gradients it receives.

In split training the publisher receives, for every training row, the gradient of the
loss with respect to its embedding. For binary labels those gradients give the labels
away (Li et al., "Label Leakage and Protection in Two-party Split Learning", ICLR 2022):

- norm scoring: the rare class gets larger gradients, so the norm ranks the labels;
- direction scoring: positives' and negatives' gradients point in opposite directions,
  so the cosine with any one gradient (the attacker takes the largest, most likely of
  the rare class) splits them.

The audit runs both attacks on a single observation of each row (its first gradient)
and on each row's gradients summed over the whole run (what an attacker that keeps
everything sees), and reports the attacker's best AUC, max(AUC, 1 - AUC): 0.5 means the
gradients tell nothing, 1.0 that they tell every label.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kedit_vfl.vfl.stages.train import binary_metrics


class GradientRecorder:
    """Per row of the overlap: the first gradient the publisher received, and the sum of
    all it received, as the publisher would keep them (bounded: two (N, d) tables)."""

    def __init__(self, rows: int, width: int) -> None:
        self.first = torch.zeros(rows, width)
        self.total = torch.zeros(rows, width)
        self.seen = torch.zeros(rows, dtype=torch.bool)
        self.count = torch.zeros(rows, dtype=torch.int32)  # gradients received per row
        self.observations = 0

    def add(self, positions: torch.Tensor, grads: torch.Tensor) -> None:
        """Gradients (B, d) of a batch-mean loss for overlap ``positions`` (B,), as sent."""
        own = grads.detach().float().cpu() * len(grads)  # each row's own gradient: B x the batch mean's
        positions = positions.detach().cpu().long()
        new = ~self.seen[positions]
        self.first[positions[new]] = own[new]
        self.seen[positions] = True
        self.total.index_add_(0, positions, own)
        self.count.index_add_(0, positions, torch.ones(len(positions), dtype=torch.int32))
        self.observations += len(positions)


def attack_auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The attacker's best AUC, max(AUC, 1 - AUC); None when the labels hold one class."""
    auc = binary_metrics(labels.numpy(), scores.double().numpy())["auc"]
    return None if auc is None else float(max(auc, 1.0 - auc))


def norm_scores(grads: torch.Tensor) -> torch.Tensor:
    return grads.norm(dim=1)


def direction_scores(grads: torch.Tensor) -> torch.Tensor:
    """Cosine with the largest gradient, the attacker's guess at one of the rare class."""
    if len(grads) == 0:
        return grads.new_zeros(0)
    reference = grads[int(norm_scores(grads).argmax())]
    return F.cosine_similarity(grads, reference.unsqueeze(0), dim=1)


def leakage(recorder: GradientRecorder, labels: torch.Tensor) -> dict[str, float | int | None]:
    """The attacks' best AUCs over the labelled rows that sent gradients.

    ``labels`` (N,) per overlap position, NaN where unlabelled.
    """
    rows = recorder.seen & ~torch.isnan(labels.cpu())
    y = labels.cpu()[rows]
    if not bool(rows.any()):
        return {
            "norm": None,
            "direction": None,
            "accumulated": None,
            "rows": 0,
            "gradients": recorder.observations,
        }
    single, summed = recorder.first[rows], recorder.total[rows]
    accumulated = [attack_auc(norm_scores(summed), y), attack_auc(direction_scores(summed), y)]
    known = [a for a in accumulated if a is not None]
    return {
        "norm": attack_auc(norm_scores(single), y),
        "direction": attack_auc(direction_scores(single), y),
        "accumulated": float(np.max(known)) if known else None,
        "rows": int(rows.sum()),
        "gradients": recorder.observations,
    }


def concentration(grads: torch.Tensor) -> float:
    """Share of the gradients' energy along their first principal direction (uncentred).

    A label-free view of what the publisher holds: label-driven gradients of binary
    labels lie along one direction, with a sign per class, so the share is near 1;
    isotropic noise spreads over every dimension (see :func:`noise_concentration`).
    """
    if len(grads) == 0:
        return 0.0
    g = grads.double()
    gram = g.T @ g
    total = float(torch.trace(gram))
    return 0.0 if total <= 0 else float(torch.linalg.eigvalsh(gram)[-1]) / total


def noise_concentration(rows: int, width: int, seed: int = 0) -> float:
    """:func:`concentration` of isotropic Gaussian noise of the same shape: the reference
    a share is read against (for few rows even noise looks concentrated)."""
    generator = torch.Generator().manual_seed(seed + 7_919)
    return concentration(torch.randn(max(rows, 1), width, generator=generator))


def attack_scores(first: torch.Tensor, total: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row, the attacks' scores on its first gradient and on the sum of all it
    received: high scores mark the rows the attacker guesses are of the rare class."""
    return {
        "norm_first": norm_scores(first),
        "direction_first": direction_scores(first),
        "norm_total": norm_scores(total),
        "direction_total": direction_scores(total),
    }


class CalibratedNoise:
    """Gradient perturbation calibrated to the gradients themselves, for the whole run.

    The clip norm is the ``quantile`` of the per-row gradient norms of the first batch
    sent (an absolute clip never binds when norms are 0.03-0.25), and every row's
    gradient gets Gaussian noise of ``multiplier x clip x sqrt(observations)``, where
    ``observations`` bounds how often one row is sent in the run: summed over the run,
    a row's noise then grows as fast as its signal can, so the accumulated observation
    keeps the noise-to-signal ratio ``multiplier`` that one observation would have.
    """

    def __init__(self, quantile: float, multiplier: float, observations: int, seed: int) -> None:
        self.quantile, self.multiplier = quantile, multiplier
        self.observations = max(1, observations)
        self.clip: float | None = None
        self.generator = torch.Generator().manual_seed(seed + 15_485_863)

    @property
    def noise_std(self) -> float | None:
        if self.clip is None:
            return None
        return self.multiplier * self.clip * self.observations**0.5

    def __call__(self, own: torch.Tensor) -> torch.Tensor:
        """Each row's own gradient (B, d), clipped and noised."""
        norms = own.norm(dim=1)
        if self.clip is None:
            self.clip = max(float(torch.quantile(norms.float().cpu(), self.quantile)), 1e-12)
        scale = (self.clip / norms.clamp_min(1e-12)).clamp(max=1.0).unsqueeze(1)
        noise = torch.randn(own.shape, generator=self.generator).to(own.device, own.dtype)
        return own * scale + noise * self.noise_std
