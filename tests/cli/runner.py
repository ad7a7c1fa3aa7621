"""Drive the real ``kvtool`` app in-process, keeping stdout and stderr apart."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner

from kedit_vfl.cli import app


def kvtool(*args: str, env: dict[str, str] | None = None) -> Any:
    """Run ``kvtool ARGS``; the result has ``exit_code``, ``stdout``, ``stderr``."""
    return CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=True)


def kvtool_json(*args: str) -> dict[str, Any]:
    """Run a command with ``--json``, assert success, return the parsed stdout."""
    result = kvtool(*args, "--json")
    assert result.exit_code == 0, result.stderr + (repr(result.exception) if result.exception else "")
    return json.loads(result.stdout)
