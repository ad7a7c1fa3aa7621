"""The ``kvtool`` executable: the CLI, imported with the garbage collector off, and an
exit without the interpreter's teardown.

Importing PyTorch, Arrow and the CLI's libraries creates hundreds of thousands of
objects that live as long as the process, and the collector scans them again and
again while they are created: 0.2-0.3 s of every command's start-up (measured on
`import kedit_vfl.cli`). After the imports they are frozen, so that later collections
(while scoring millions of rows, say) never scan them either.

Tearing the interpreter down after the command frees those objects one by one and
runs the libraries' static destructors: 0.2-0.27 s after `vfl score` had written its
last byte, 0.2 s after `--help` (measured), with nothing left to see. So the process
does what a normal exit does that can be seen from outside (other threads joined,
`atexit` handlers run, the standard streams flushed) and then leaves with
:func:`os._exit`. The one difference: a file object still open at the end would not
be flushed by its destructor; every file ``kvtool`` writes is closed when it is done
(``with`` blocks, :func:`kedit_vfl.artifacts.atomic_write`).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading


def main() -> None:
    """Run the command line and exit with its status; never returns."""
    exit_now(run())


def run() -> int:
    """The command line's exit status, the CLI imported with the collector off."""
    gc.disable()
    try:
        from kedit_vfl.cli import main as cli
    finally:
        gc.freeze()
        gc.enable()
    try:
        cli()
    except SystemExit as done:
        return exit_status(done.code)
    return 0


def exit_status(code: object) -> int:
    """What ``sys.exit(code)`` exits with; a message instead of a number goes to stderr."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def exit_now(status: int) -> None:
    """Everything of a normal exit that can be seen outside the process, then ``os._exit``."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what a normal exit runs next (logging's flush, for one)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what Python exits with then
            status = status or 120
    os._exit(status)
