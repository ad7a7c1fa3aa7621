"""The ``kvtool`` executable: the command line, and a quiet end when a reader closes the pipe.

``kvtool ... | head`` is how a shell pipeline reads part of a command's output. When the
reader goes away, writing to stdout fails; a Unix tool then ends quietly. kvtool does
too: no traceback and no "internal error", exit status 0 (the reader already has what it
wanted), so ``set -o pipefail`` pipelines keep working. Start-up is fast because the
command line imports nothing heavy (PyTorch, Arrow, transformers load inside the
commands that need them), not because of tricks here.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Run the command line and exit with its status."""
    sys.exit(run())


def run() -> int:
    """The command line's exit status."""
    if sys.argv[1:] == ["--version"]:  # answered before the command line is built (~0.1 s)
        from kedit_vfl import __version__

        print(f"kvtool {__version__}")
        return 0
    from kedit_vfl.cli import main as cli

    before = _stdout_identity()
    try:
        cli()
    except SystemExit as done:
        return _closed_pipe_status() if _stdout_closed(before) else exit_status(done.code)
    except BrokenPipeError:
        return _closed_pipe_status()
    return _closed_pipe_status() if _stdout_closed(before) else 0


def exit_status(code: object) -> int:
    """What ``sys.exit(code)`` exits with; a message instead of a number goes to stderr."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _stdout_identity() -> tuple[int, int] | None:
    try:
        found = os.fstat(sys.__stdout__.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return found.st_dev, found.st_ino


def _stdout_closed(before: tuple[int, int] | None) -> bool:
    """Whether the reader of stdout has gone. rich and click handle the broken pipe
    themselves (rich points stdout at /dev/null, then exits 1; click wraps stdout so the
    flush stays quiet, then exits 1); a pending flush may fail."""
    if _reader_gone():
        return True
    now = _stdout_identity()
    if before is not None and now is not None and now != before:
        null = os.stat(os.devnull)
        if now == (null.st_dev, null.st_ino):
            return True
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    return False


def _reader_gone() -> bool:
    """A pipe whose reading end is closed polls as an error on its writing end."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.__stdout__.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _closed_pipe_status() -> int:
    # Python would report the failed flush at exit; point stdout at /dev/null instead.
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.__stdout__.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    os.close(devnull)
    return 0
