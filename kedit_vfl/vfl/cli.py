"""``kvtool vfl``: the VFed-SSD commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Vertical federated learning (VFed-SSD): MPD pretraining, split training, distillation, scoring.",
    no_args_is_help=True,
)
