"""Two real ``kvtool`` processes, one per party, over the loopback interface.

Each party gets its own TLS identity (made once per test session) and pins the other's
certificate, as in production; ``secure=False`` runs them with ``--insecure`` instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from kedit_vfl.vfl.channel.identity import generate_identity

KVTOOL = str(Path(sys.executable).parent / "kvtool")
OTHER = {"active": "passive", "passive": "active"}


@cache
def identities() -> Path:
    """A folder with ``active/`` and ``passive/`` identities (key.pem, cert.pem) for this session."""
    folder = Path(tempfile.mkdtemp(prefix="kvtool-identities-"))
    for party in OTHER:
        generate_identity(folder / party, party)
    return folder


def security_args(party: str, secure: bool = True) -> list[str]:
    """The flags that authenticate ``party`` and pin its peer (or ``--insecure``)."""
    if not secure:
        return ["--insecure"]
    folder = identities()
    return ["--identity", str(folder / party), "--peer-cert", str(folder / OTHER[party] / "cert.pem")]


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
    party: str,
    command: str,
    args: list[Any],
    port: int,
    env: dict[str, str] | None = None,
    secure: bool = True,
) -> subprocess.Popen:
    argv = [KVTOOL, "vfl", command, "--party", party, "--rendezvous", f"tcp://127.0.0.1:{port}"]
    argv += [str(a) for a in args] + security_args(party, secure) + ["--quiet", "--json"]
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
    secure: bool = True,
    relay: Any = None,
) -> tuple[Finished, Finished]:
    """Run both parties of one command to the end; (active, passive).

    With ``relay`` (a :class:`tests.relay.Relay`), the passive party connects through it.
    """
    port = free_port()
    passive_port = relay.start(port) if relay is not None else port
    p = start("passive", command, passive, passive_port, env, secure)
    a = start("active", command, active, port, env, secure)
    try:
        return finish(a, timeout), finish(p, timeout)
    finally:
        if relay is not None:
            relay.stop()
