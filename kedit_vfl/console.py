"""Everything that talks to the terminal: Rich logs and progress on stderr, JSON on stdout.

Only this module and the ``cli.py`` files import typer or rich; library code reports
through :class:`kedit_vfl.progress.Reporter`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# Options every command shares, so that their names and help stay identical.
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout (logs go to stderr).")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs on stderr.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (cuda if available), cpu or cuda.")]
SignKeyOption = Annotated[
    Optional[Path],
    typer.Option(
        "--sign-key",
        envvar="KVTOOL_SIGN_KEY",
        help="Sign the artifacts this command writes with this Ed25519 key (from 'kvtool sign-keygen').",
    ),
]
TrustOption = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--trust",
        envvar="KVTOOL_TRUST",
        help="Accept only artifacts signed by this public key (signing.pub; repeat for several).",
    ),
]


def debug_enabled() -> bool:
    return os.environ.get("KVTOOL_DEBUG", "") not in ("", "0")


def stderr_console() -> Console:
    # Created per call so that test runners that swap sys.stderr capture the output.
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def chained(flag: str, path: Any, quiet: bool = False) -> None:
    """Say on stderr which file a command read because ``flag`` was not given."""
    if not quiet:
        stderr_console().print(
            f"reading {path} ({flag} not given: the default output of the previous command)",
            markup=False,
            highlight=False,
        )


def error_line(message: str) -> None:
    """One clear line on stderr for a user error."""
    from rich.markup import escape

    stderr_console().print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)


def emit_json(payload: Any, stream: Any = None) -> None:
    """The command's one JSON object, on stdout (or ``stream``) and nothing else there."""
    stream = stream or sys.stdout
    stream.write(json.dumps(_json_safe(payload), indent=2, sort_keys=False) + "\n")
    stream.flush()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], stream: Any = None
) -> None:
    """A Rich table for people, on stdout (or ``stream``)."""
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_format_cell(v) for v in row))
    Console(file=stream or sys.stdout, highlight=False).print(table)


def print_kv(title: str, items: dict[str, Any], stream: Any = None) -> None:
    print_table(title, ["field", "value"], [[k, v] for k, v in items.items()], stream)


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):  # a nested result (label_leakage, defence): "key value; ..."
        return "; ".join(f"{k.replace('_', ' ')} {_format_cell(v)}" for k, v in value.items())
    return str(value)


class _RichTask:
    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress = progress
        self._task_id = task_id

    def advance(self, n: float = 1, **metrics: float) -> None:
        if self._progress is None or self._task_id is None:
            return
        text = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self._progress.update(self._task_id, advance=n, metrics=text)


class RichReporter:
    """Progress bars and logs on stderr; silent with ``--quiet`` or when stderr is no terminal."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.interactive = not quiet and sys.stderr.isatty()

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_RichTask]:
        if not self.interactive:
            yield _RichTask(None, None)
            return
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=stderr_console(),
            transient=False,
        )
        with progress:
            task_id = progress.add_task(description, total=total, metrics="")
            yield _RichTask(progress, task_id)

    def log(self, message: str) -> None:
        if not self.quiet:
            stderr_console().print(message, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        stderr_console().print(f"[yellow]warning:[/] {message}", markup=True, highlight=False)
