"""``kvtool edit``: the InstructEdit commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Knowledge editing (InstructEdit): train one editor, apply edits, evaluate them.",
    no_args_is_help=True,
)
