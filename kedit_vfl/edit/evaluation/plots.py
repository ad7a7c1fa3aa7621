"""Plots: the scatter of ``analyze-gradients`` (one panel per editor or mode) and the
retention curve of ``evaluate --sequential``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen needed, and the same picture everywhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kedit_vfl.artifacts import atomic_write  # noqa: E402


def scatter_panels(panels: list[dict[str, Any]], labels: list[str], holdout: str | None, path: Path) -> None:
    """Write a PNG with one PCA scatter per panel (``name``, ``projected_2d``, scores)."""
    tasks = sorted(set(labels), key=lambda t: (t == holdout, t))
    colours = plt.get_cmap("tab10")
    label_array = np.asarray(labels)
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        points = np.asarray(panel["projected_2d"])
        for i, task in enumerate(tasks):
            mask = label_array == task
            is_holdout = task == holdout
            axis.scatter(
                points[mask, 0],
                points[mask, 1],
                s=36 if is_holdout else 16,
                marker="x" if is_holdout else "o",
                color=colours(i % 10),
                alpha=0.9 if is_holdout else 0.6,
                label=f"{task} (hold-out)" if is_holdout else task,
            )
            centre = points[mask].mean(axis=0)
            axis.annotate(task, centre, fontsize=9, weight="bold", ha="center")
        ev = panel["explained_variance_2d"]
        axis.set_xlabel(f"PC1 ({100 * ev[0]:.1f}% of variance)")
        axis.set_ylabel(f"PC2 ({100 * ev[1]:.1f}% of variance)")
        axis.set_title(
            f"{panel['name']}\nsilhouette 2-D {panel['silhouette_2d']:.2f}, "
            f"reduced {panel['silhouette_reduced']:.2f}",
            fontsize=10,
        )
        axis.legend(fontsize=8, loc="best")
        axis.grid(alpha=0.2)
    figure.suptitle("Editor update directions, PCA by task")
    figure.tight_layout()
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)


def retention_curves(curves: dict[str, list[dict[str, Any]]], sequential: int, path: str | Path) -> None:
    """Write a PNG: Reliability of all edits so far and their Locality, per method."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for name, curve in curves.items():
        edits = [p["edits"] for p in curve]
        for axis, key in zip(axes[0], ("retention", "locality"), strict=True):
            axis.plot(
                edits, [p[key] if p[key] is not None else np.nan for p in curve], marker="o", label=name
            )
    for axis, title in zip(axes[0], ("Retention (Reliability of all edits so far)", "Locality"), strict=True):
        axis.set_xlabel("edits in a row")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.2)
        axis.legend(fontsize=8)
    figure.suptitle(f"Sequential editing, sequences of {sequential}")
    figure.tight_layout()
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
