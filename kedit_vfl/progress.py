"""A tiny reporting interface so that library code can show progress without printing.

Library functions take a :class:`Reporter`; the CLI passes one backed by Rich
(``kedit_vfl.console``), tests and library users get the silent default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Task(Protocol):
    def advance(self, n: float = 1, **metrics: float) -> None: ...


class Reporter(Protocol):
    def task(self, description: str, total: float | None) -> AbstractContextManager[Task]: ...

    def log(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...


class _SilentTask:
    def advance(self, n: float = 1, **metrics: float) -> None:
        return None


class SilentReporter:
    """Reports nothing: the default for library use and tests."""

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_SilentTask]:
        yield _SilentTask()

    def log(self, message: str) -> None:
        return None

    def warn(self, message: str) -> None:
        return None


SILENT = SilentReporter()
