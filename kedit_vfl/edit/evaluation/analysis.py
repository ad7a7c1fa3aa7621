"""Numbers for how an editor's update directions cluster by task (``analyze-gradients``).

The InstructEdit paper argues from PCA pictures that instructions give each task its
own update direction. Here the same claim becomes numbers that can be compared between
editors: PCA explained variance, silhouette scores of the task labels (in 2-D and in the
space that keeps 90% of the variance), the ratio of between-task to within-task cosine
distance, and, for a hold-out task, the trained task whose centroid it lands nearest.

Updates are represented at a fixed size so memory never grows with the model: a layer's
update ``dW = sum_t d_t x_t^T`` (out x in) is either flattened exactly (small layers) or
sketched as ``P_out^T dW P_in`` with fixed Gaussian matrices, computed from the factors
without forming ``dW``. This Kronecker-structured random projection preserves inner
products in expectation, so distances and angles survive it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.metrics.pairwise import cosine_distances


@dataclass(frozen=True)
class UpdateSketch:
    """Fixed random projections for one layer shape (``out x in``)."""

    p_out: torch.Tensor  # (out, k_out)
    p_in: torch.Tensor  # (in, k_in)

    @classmethod
    def create(cls, out_features: int, in_features: int, k: int, seed: int) -> UpdateSketch:
        generator = torch.Generator().manual_seed(seed)
        k_out, k_in = min(k, out_features), min(k, in_features)
        p_out = torch.randn(out_features, k_out, generator=generator) / k_out**0.5
        p_in = torch.randn(in_features, k_in, generator=generator) / k_in**0.5
        return cls(p_out, p_in)

    @property
    def size(self) -> int:
        return self.p_out.shape[1] * self.p_in.shape[1]


def exact_update(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Flattened ``sum_t delta_t x_t^T``: (T, out), (T, in) -> (out * in,)."""
    return (delta.T.float() @ x.float()).reshape(-1)


def sketched_update(delta: torch.Tensor, x: torch.Tensor, sketch: UpdateSketch) -> torch.Tensor:
    """``vec(P_out^T (sum_t delta_t x_t^T) P_in)`` without forming the update matrix."""
    left = delta.float() @ sketch.p_out.to(delta.device)  # (T, out) -> (T, k_out)
    right = x.float() @ sketch.p_in.to(x.device)  # (T, in) -> (T, k_in)
    return (left.T @ right).reshape(-1)  # (k_out, k_in) -> (k_out * k_in,)


@dataclass(frozen=True)
class PCASummary:
    explained_2d: list[float]
    n_components_90: int
    explained_90: list[float]
    projected_2d: np.ndarray  # (n, 2)
    reduced: np.ndarray  # (n, n_components_90)


def pca_summary(features: np.ndarray, seed: int = 0) -> PCASummary:
    """PCA to 2 components and to the fewest components that keep 90% of the variance."""
    features = np.asarray(features, dtype=np.float64)
    n, dim = features.shape
    centred = features - features.mean(axis=0, keepdims=True)
    if float((centred**2).sum()) <= 1e-20 * max(1.0, float((features**2).sum())):
        # All updates identical: no direction explains anything.
        zeros = np.zeros((n, 2))
        return PCASummary([0.0, 0.0], 1, [0.0], zeros, np.zeros((n, 1)))
    max_components = min(n, dim)
    full = PCA(n_components=max_components, svd_solver="full", random_state=seed).fit(features)
    ratios = full.explained_variance_ratio_
    n90 = int(np.searchsorted(np.cumsum(ratios), 0.9 - 1e-12) + 1)
    n90 = max(1, min(n90, max_components))
    transformed = full.transform(features)
    projected = np.zeros((n, 2))
    projected[:, : min(2, max_components)] = transformed[:, :2]
    explained_2d = [float(r) for r in ratios[:2]] + [0.0] * (2 - min(2, len(ratios)))
    return PCASummary(explained_2d, n90, [float(r) for r in ratios[:n90]], projected, transformed[:, :n90])


def silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette of the task labels; 0 where points cannot be told apart at all."""
    labels = np.asarray(labels)
    if len(set(labels.tolist())) < 2 or len(labels) <= len(set(labels.tolist())):
        return float("nan")
    if float(np.ptp(points, axis=0).max(initial=0.0)) <= 1e-12:
        return 0.0
    return float(silhouette_score(points, labels, metric="euclidean"))


def cosine_separation(features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean between-task and within-task cosine distance, and their ratio (>1: tasks separate)."""
    labels = np.asarray(labels)
    distances = cosine_distances(np.asarray(features, dtype=np.float64))  # (n, n)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    within = float(distances[same & off_diagonal].mean()) if (same & off_diagonal).any() else float("nan")
    between = float(distances[~same].mean()) if (~same).any() else float("nan")
    if within <= 1e-12:
        ratio = 1.0 if between <= 1e-12 else float("inf")
    else:
        ratio = between / within
    return {"between": between, "within": within, "ratio": ratio}


def nearest_trained_task(
    points: np.ndarray, labels: np.ndarray, holdout: str, trained: list[str]
) -> dict[str, object]:
    """The trained task whose centroid is nearest the hold-out task's centroid."""
    labels = np.asarray(labels)
    centre = points[labels == holdout].mean(axis=0)
    distances = {
        task: float(np.linalg.norm(points[labels == task].mean(axis=0) - centre)) for task in trained
    }
    nearest = min(distances, key=distances.__getitem__)
    return {"task": holdout, "nearest": nearest, "centroid_distances": distances}


def separation_report(
    features: np.ndarray, labels: list[str], holdout: str | None = None, seed: int = 0
) -> dict[str, object]:
    """Everything ``analysis.json`` says about one editor (or one mode of it)."""
    features = np.asarray(features, dtype=np.float64)
    label_array = np.asarray(labels)
    summary = pca_summary(features, seed=seed)
    report: dict[str, object] = {
        "n_updates": int(features.shape[0]),
        "representation_size": int(features.shape[1]),
        "explained_variance_2d": summary.explained_2d,
        "n_components_90": summary.n_components_90,
        "explained_variance_90": summary.explained_90,
        "silhouette_2d": silhouette(summary.projected_2d, label_array),
        "silhouette_reduced": silhouette(summary.reduced, label_array),
        "cosine": cosine_separation(features, label_array),
        "projected_2d": summary.projected_2d.round(6).tolist(),
    }
    if holdout is not None and holdout in set(labels):
        trained = sorted(set(labels) - {holdout})
        if trained:
            report["holdout"] = nearest_trained_task(summary.reduced, label_array, holdout, trained)
    return report
