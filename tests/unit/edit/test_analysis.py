from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kedit_vfl.edit.evaluation.analysis import (
    UpdateSketch,
    cosine_separation,
    exact_update,
    separation_report,
    sketched_update,
)
from kedit_vfl.edit.evaluation.plots import scatter_panels


def _clusters(spread: float, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = np.eye(4, 32) * 10
    features = np.concatenate([c + spread * rng.standard_normal((20, 32)) for c in centres])
    labels = [t for t in ("a", "b", "c", "d") for _ in range(20)]
    return features, labels


def test_well_separated_updates_have_silhouette_near_one() -> None:
    features, labels = _clusters(spread=0.05)
    report = separation_report(features, labels)
    assert report["silhouette_reduced"] > 0.95
    assert report["cosine"]["ratio"] > 10


def test_identical_updates_have_silhouette_zero() -> None:
    features = np.tile(np.arange(32.0), (80, 1))
    labels = [t for t in ("a", "b", "c", "d") for _ in range(20)]
    report = separation_report(features, labels)
    assert report["silhouette_2d"] == 0.0 and report["silhouette_reduced"] == 0.0
    assert report["cosine"]["ratio"] == 1.0


def test_random_labels_do_not_separate() -> None:
    rng = np.random.default_rng(1)
    features = rng.standard_normal((200, 16))
    labels = list(rng.choice(["a", "b", "c", "d"], size=200))
    report = separation_report(features, labels)
    assert abs(report["silhouette_reduced"]) < 0.1
    assert abs(report["cosine"]["ratio"] - 1.0) < 0.05


def test_holdout_lands_next_to_the_task_it_resembles() -> None:
    features, labels = _clusters(spread=0.05)
    near_b = (
        np.eye(1, 32, 1) * 10
        + np.eye(1, 32, 5) * 2
        + 0.05 * np.random.default_rng(2).standard_normal((20, 32))
    )
    report = separation_report(np.concatenate([features, near_b]), labels + ["z"] * 20, holdout="z")
    assert report["holdout"]["nearest"] == "b"
    assert set(report["holdout"]["centroid_distances"]) == {"a", "b", "c", "d"}


def test_ninety_percent_components_are_counted() -> None:
    features, labels = _clusters(spread=0.01)
    report = separation_report(features, labels)
    assert report["n_components_90"] == 3  # four centres span a 3-D affine subspace
    assert sum(report["explained_variance_90"]) >= 0.9


def test_sketch_preserves_geometry_of_updates() -> None:
    generator = torch.Generator().manual_seed(0)
    sketch = UpdateSketch.create(256, 128, k=48, seed=3)
    factors = [
        (torch.randn(5, 256, generator=generator), torch.randn(5, 128, generator=generator)) for _ in range(6)
    ]
    exact = torch.stack([exact_update(d, x) for d, x in factors])
    sketched = torch.stack([sketched_update(d, x, sketch) for d, x in factors])
    # The sketch is linear in the update, so it equals projecting the exact update.
    first = (sketch.p_out.T @ exact[0].reshape(256, 128) @ sketch.p_in).reshape(-1)
    assert torch.allclose(sketched[0], first, atol=1e-3)
    exact_norms, sketch_norms = exact.norm(dim=1), sketched.norm(dim=1)
    assert torch.all((sketch_norms / exact_norms - 1).abs() < 0.5)


def test_cosine_separation_ratio_definition() -> None:
    features = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    result = cosine_separation(features, np.array(["a", "a", "b", "b"]))
    assert result["within"] == 0.0 and result["between"] == 1.0 and result["ratio"] == float("inf")


def test_scatter_plot_is_written(tmp_path: Path) -> None:
    features, labels = _clusters(spread=0.5)
    panels = [
        {"name": name, **separation_report(features, labels, holdout="d")} for name in ("with", "without")
    ]
    scatter_panels(panels, labels, "d", tmp_path / "scatter.png")
    assert (tmp_path / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
