"""The two-party channel under attack, with real ``kvtool`` processes on 127.0.0.1.

An attacker on the path (a relay that changes, drops, replays or reorders one piece of
the stream), a peer that claims huge messages, and set-ups that must be refused before
anything waits on the network.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kedit_vfl.errors import PeerError
from kedit_vfl.vfl.channel.session import fault_hint
from kedit_vfl.vfl.channel.transport import FRAME, Security, open_channel
from tests.cli.runner import kvtool
from tests.cli.vfl.parties import Finished, free_port, identities, run_pair, start
from tests.relay import Relay

AFTER = 20_000  # bytes into the stream to the passive party: past the handshake, during the work


def _once(action: str) -> Any:
    """A relay tamper function that acts on one chunk of the stream to the passive party."""
    state: dict[str, Any] = {"done": False, "held": None}

    def tamper(direction: str, chunk: bytes, seen: int) -> list[bytes]:
        if direction != "to_passive":
            return [chunk]
        if state["held"] is not None:  # reorder: the held chunk goes after this one
            held, state["held"] = state["held"], None
            return [chunk, held]
        if state["done"] or seen + len(chunk) < AFTER:
            return [chunk]
        state["done"] = True
        if action == "flip":
            middle = len(chunk) // 2
            return [chunk[:middle] + bytes([chunk[middle] ^ 0x01]) + chunk[middle + 1 :]]
        if action == "drop":
            return []
        if action == "replay":
            return [chunk, chunk]
        state["held"] = chunk  # reorder
        return []

    return tamper


def _one_line(result: Finished) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("action", ["flip", "drop", "replay", "reorder"])
def test_a_relay_that_tampers_ends_both_sides(tables: dict[str, Path], tmp_path: Path, action: str) -> None:
    relay = Relay(tamper=_once(action))
    started = time.monotonic()
    a, p = run_pair(
        "pretrain-mpd",
        ["--active", tables["active_train"], "--epochs", "3", "--timeout", "5", "--out", tmp_path / "a.st"],
        ["--passive", tables["passive_train"], "--epochs", "3", "--timeout", "5", "--out", tmp_path / "p.st"],
        relay=relay,
        timeout=60,
    )
    assert relay.connections == 1 and len(relay.recorded["to_passive"]) >= AFTER
    assert a.code == 1 and p.code == 1, (a.stderr, p.stderr)
    for result in (a, p):
        line = _one_line(result)
        assert line.startswith("error: ") and "party" in line and "Traceback" not in result.stderr
    assert any("tampered" in r.stderr or "no answer within 5 s" in r.stderr for r in (a, p))
    assert time.monotonic() - started < 40
    assert not (tmp_path / "a.st").exists() and not (tmp_path / "p.st").exists()


def _peak_rss_kb(process: subprocess.Popen, timeout: float = 60) -> tuple[int, int]:
    """Exit status and peak resident memory (KB) of a child, from the kernel's own account."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage.ru_maxrss
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the passive party did not exit")


def _claim(tables: dict[str, Path], tmp_path: Path, frame: bytes) -> tuple[int, int, str]:
    """A malicious but authenticated active party: it sends ``frame`` as its first message."""
    port, folder = free_port(), identities()
    security = Security(identity=folder / "active", peer_cert=folder / "passive" / "cert.pem")
    box: dict[str, Any] = {}

    def active() -> None:
        try:
            with open_channel("active", f"tcp://127.0.0.1:{port}", 30, security) as channel:
                channel._socket().sendall(frame)
                channel.recv((1,), torch.int64, "nothing")  # until the passive party hangs up
        except PeerError as exc:
            box["error"] = exc

    thread = threading.Thread(target=active)
    thread.start()
    passive = start(
        "passive", "pretrain-mpd", ["--passive", tables["passive_train"], "--out", tmp_path / "p.st"], port
    )
    code, peak = _peak_rss_kb(passive)
    thread.join(30)
    return code, peak, passive.stderr.read() if passive.stderr else ""


@pytest.mark.slow
def test_claimed_huge_messages_are_refused_without_allocating(
    tables: dict[str, Path], tmp_path: Path
) -> None:
    code, baseline, stderr = _claim(tables, tmp_path, FRAME.pack(2) + b"{]")
    assert code == 1 and "malformed handshake" in stderr, stderr
    for claim in (2 << 30, 1 << 40):
        code, peak, stderr = _claim(tables, tmp_path, FRAME.pack(claim) + b"{}")
        assert code == 1, stderr
        assert f"announced {claim:,} bytes of handshake" in stderr and stderr.count("\n") == 1, stderr
        assert peak - baseline < 100 * 1024, f"memory grew by {(peak - baseline) / 1024:.0f} MB"


@pytest.mark.parametrize(
    ("command", "flags", "expected"),
    [
        ("pretrain-mpd", ["--party", "active"], "--identity DIR"),
        ("train-split", ["--party", "passive", "--identity", "x"], "--peer-cert FILE"),
        ("pretrain-mpd", ["--party", "passive", "--insecure"], "is not a loopback address"),
    ],
)
def test_unsafe_set_ups_are_refused_before_any_wait(
    tables: dict[str, Path], command: str, flags: list[str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KVTOOL_DEBUG")  # the user's view: one line, no traceback
    started = time.monotonic()
    table = (
        ["--active", tables["active_train"]] if "active" in flags else ["--passive", tables["passive_train"]]
    )
    result = kvtool("vfl", command, *flags, *table, "--rendezvous", "tcp://10.9.8.7:29500")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert time.monotonic() - started < 15  # refused at start, not after a connection timeout


def test_align_refuses_an_unsafe_set_up(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("id\nu1\n")
    result = kvtool(
        "vfl", "align", "--party", "active", "--table", tmp_path / "a.csv", "--rendezvous", "tcp://10.9.8.7:1"
    )
    assert result.exit_code == 2 and "--identity DIR" in result.stderr


def test_fault_messages_name_only_flags_the_command_has() -> None:
    assert "--resume" in fault_hint("pretrain-mpd") and "--resume" in fault_hint("train-split")
    assert "--resume" not in fault_hint("distill") and "--resume" not in fault_hint("score")


def test_keygen_writes_an_identity_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    result = kvtool("vfl", "keygen", "--out", tmp_path / "me", "--json")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "me" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert '"fingerprint": "SHA256:' in result.stdout
    again = kvtool("vfl", "keygen", "--out", tmp_path / "me")
    assert again.exit_code == 2 and "--force" in again.stderr
