"""The ``kvtool`` executable: the CLI, imported with the garbage collector off.

Importing PyTorch, Arrow and the CLI's libraries creates hundreds of thousands of
objects that live as long as the process, and the collector scans them again and
again while they are created: 0.2-0.3 s of every command's start-up (measured on
`import kedit_vfl.cli`). After the imports they are frozen, so that later collections
(while scoring millions of rows, say) never scan them either.
"""

from __future__ import annotations

import gc


def main() -> None:
    gc.disable()
    try:
        from kedit_vfl.cli import main as run
    finally:
        gc.freeze()
        gc.enable()
    run()
