"""Two real ``kvtool`` processes, one per party, over the loopback interface."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KVTOOL = str(Path(sys.executable).parent / "kvtool")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Finished:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout)


def start(
    party: str, command: str, args: list[Any], port: int, env: dict[str, str] | None = None
) -> subprocess.Popen:
    argv = [KVTOOL, "vfl", command, "--party", party, "--rendezvous", f"tcp://127.0.0.1:{port}"]
    argv += [str(a) for a in args] + ["--quiet", "--json"]
    environment = {**os.environ, "KVTOOL_DEBUG": "", **(env or {})}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


def finish(process: subprocess.Popen, timeout: float = 120) -> Finished:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"process did not finish in {timeout} s: {err}") from None
    return Finished(process.returncode, out, err)


def run_pair(
    command: str,
    active: list[Any],
    passive: list[Any],
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> tuple[Finished, Finished]:
    """Run both parties of one command to the end; (active, passive)."""
    port = free_port()
    p = start("passive", command, passive, port, env)
    a = start("active", command, active, port, env)
    return finish(a, timeout), finish(p, timeout)
