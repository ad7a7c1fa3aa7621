"""Where things live by default: ``runs/`` outputs, the embedded data, the cache.

Bare commands chain through these defaults: each reads the previous command's default
output under ``runs/`` (relative to the current folder) and writes its own there.
"""

from __future__ import annotations

import os
from pathlib import Path

# data/ sits beside the package in a source checkout (the supported install is editable).
PROJECT_DATA = Path(__file__).resolve().parent.parent / "data"


def runs_dir() -> Path:
    """Default output folder: ``$KVTOOL_RUNS`` or ``./runs``."""
    return Path(os.environ.get("KVTOOL_RUNS", "runs"))


def cache_dir() -> Path:
    """Built assets that are too large to ship (``$KVTOOL_CACHE`` or ``~/.cache/kvtool``)."""
    root = os.environ.get("KVTOOL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvtool")
    return Path(root)


def embedded_data_dir() -> Path:
    """The shipped demo data, or the cache where it is regenerated from its seed."""
    return PROJECT_DATA if PROJECT_DATA.is_dir() else cache_dir() / "data"
