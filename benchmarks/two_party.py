"""Shared by the two-party benchmarks: a free loopback port, and one stage of both parties
run as two real ``kvtool vfl`` processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

KVTOOL = str(Path(sys.executable).parent / "kvtool")
PARTIES = ("passive", "active")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_pair(
    command: str,
    args: Mapping[str, list[Any]],
    security: Callable[[str], list[Any]],
    ports: Mapping[str, int],
) -> dict[str, dict[str, Any]]:
    """``kvtool vfl COMMAND --party P`` for both parties at once, each with its ``args``,
    ``security(P)`` options and rendezvous port; each party's ``--json`` result."""
    procs = {
        party: subprocess.Popen(
            [
                KVTOOL,
                "vfl",
                command,
                "--party",
                party,
                *map(str, args[party]),
                *map(str, security(party)),
                "--rendezvous",
                f"tcp://127.0.0.1:{ports[party]}",
                "--json",
                "--quiet",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for party in PARTIES
    }
    outputs = {party: proc.communicate(timeout=1800) for party, proc in procs.items()}
    for party, proc in procs.items():
        if proc.returncode:
            raise SystemExit(f"two-party {command} failed ({party}): {outputs[party][1]}")
    return {party: json.loads(out) for party, (out, _) in outputs.items()}
