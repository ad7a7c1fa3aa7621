"""``kvtool vfl align``: two real processes on 127.0.0.1, bounded in time."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kedit_vfl.artifacts import load_artifact
from tests.cli.vfl.parties import security_args
from tests.relay import Relay

KVTOOL = str(Path(sys.executable).parent / "kvtool")
WAIT = 90  # seconds: generous for two cold starts on a busy 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(tmp_path: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KVTOOL_DEBUG"}
    return {**env, "KVTOOL_RUNS": str(tmp_path / "runs"), **more}


def _start(
    party: str,
    table: Path,
    out: Path,
    port: int,
    env: dict[str, str],
    *extra: object,
    timeout: float = 20,
    secure: bool = True,
) -> subprocess.Popen:
    args = [KVTOOL, "vfl", "align", "--party", party, "--table", table, "--out", out]
    args += ["--rendezvous", f"tcp://127.0.0.1:{port}", "--timeout", timeout, *extra]
    args += security_args(party, secure)
    return subprocess.Popen(
        [str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"kvtool vfl align did not finish within {WAIT} s: {stderr}")
    return process.returncode, stdout, stderr


def _pair(
    tmp_path: Path,
    a: Path,
    b: Path,
    *extra: object,
    env: dict[str, str] | None = None,
    relay: Relay | None = None,
    secure: bool = True,
) -> dict:
    port, env = free_port(), env or _env(tmp_path)
    outs = {"active": tmp_path / "active.safetensors", "passive": tmp_path / "passive.safetensors"}
    active = _start("active", a, outs["active"], port, env, "--quiet", *extra, secure=secure)
    time.sleep(0.5)  # the active party hosts the rendezvous
    passive_port = relay.start(port) if relay is not None else port
    passive = _start("passive", b, outs["passive"], passive_port, env, "--quiet", *extra, secure=secure)
    try:
        return {"active": _finish(active), "passive": _finish(passive), "outs": outs}
    finally:
        if relay is not None:
            relay.stop()


def _tables(tmp_path: Path, kind: str, dup: str | None = None) -> tuple[Path, Path, list, list, set]:
    """300 active and 250 passive ids, 120 shared, shuffled; long ids, so no byte pattern is chance."""
    rng = random.Random(7)
    make = (lambda i: 10**11 + i) if kind == "int" else (lambda i: f"user-{i:09d}")
    pool = [make(i) for i in rng.sample(range(10**8), 430)]
    shared, only_a, only_b = pool[:120], pool[120:300], pool[300:]
    ids_a, ids_b = shared + only_a, shared + only_b
    rng.shuffle(ids_a)
    rng.shuffle(ids_b)
    if dup is not None:
        ids_a[5] = ids_a[9]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("id,x\n" + "".join(f"{i},{n % 7}\n" for n, i in enumerate(ids_a)))
    b.write_text("id,p\n" + "".join(f"{i},{n % 5}\n" for n, i in enumerate(ids_b)))
    return a, b, ids_a, ids_b, {str(i) for i in shared}


def _error(result: tuple[int, str, str], code: int, expected: str) -> None:
    returncode, stdout, stderr = result
    lines = stderr.strip().splitlines()
    assert returncode == code, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0], lines[0]


def _no_output(outs: dict[str, Path]) -> None:
    for out in outs.values():
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def _no_id_crossed(blob: bytes, ids: list) -> None:
    for value in {str(i) for i in ids}:
        raw = value.encode()
        assert raw not in blob, f"id {value} was sent in the clear"
        for digest in (hashlib.sha256, hashlib.md5, hashlib.sha1):
            assert digest(raw).digest()[:7] not in blob, f"an unsalted {digest.__name__} of {value} was sent"


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "reveal"), [("int", "both"), ("str", "both"), ("str", "active-only")])
def test_align_two_processes(tmp_path: Path, kind: str, reveal: str) -> None:
    a, b, ids_a, ids_b, shared = _tables(tmp_path, kind)
    relay = Relay()
    run = _pair(tmp_path, a, b, "--reveal", reveal, relay=relay)
    for party in ("active", "passive"):
        assert run[party][0] == 0, run[party][2]
    active = load_artifact(run["outs"]["active"], "vfl.alignment")
    passive = load_artifact(run["outs"]["passive"], "vfl.alignment")
    assert active.extra["fingerprint"] == passive.extra["fingerprint"]
    assert active.extra["run_id"] == passive.extra["run_id"]
    keys_a, rows_a = active.tensors["keys"], active.tensors["rows"]
    keys_b, rows_b = passive.tensors["keys"], passive.tensors["rows"]
    # The active party's rows are exactly those whose ids the passive party holds, ascending.
    assert rows_a.tolist() == [r for r, i in enumerate(ids_a) if str(i) in shared]
    assert active.extra["intersection_size"] == 120
    assert torch.equal(keys_b, keys_b.sort().values) and bool((keys_a >= 0).all())
    if reveal == "both":
        assert passive.extra["intersection_size"] == 120
        assert torch.equal(keys_a.sort().values, keys_b)
    else:
        assert passive.extra["intersection_size"] is None
        assert sorted(rows_b.tolist()) == list(range(len(ids_b)))
        assert bool(torch.isin(keys_a, keys_b).all())
    # The same key names the same user on both sides.
    where = torch.searchsorted(keys_b, keys_a)
    assert [str(ids_a[r]) for r in rows_a.tolist()] == [str(ids_b[r]) for r in rows_b[where].tolist()]
    # What a listener on the path saw: no id, no unsalted digest of one, no handshake field.
    assert relay.connections == 1
    for blob in relay.recorded.values():
        assert len(blob) > 1000
        _no_id_crossed(bytes(blob), ids_a + ids_b)
        for field in (b"protocol", b"nonce", b"reveal", b"fingerprint", b"rows", b"id_type"):
            assert field not in blob, f"handshake field {field!r} crossed in the clear"


@pytest.mark.slow
def test_align_insecure_on_loopback_is_plain_but_sends_no_id(tmp_path: Path) -> None:
    """--insecure: the relay reads the protocol (so the test above can fail), yet no id crosses."""
    a, b, ids_a, ids_b, _ = _tables(tmp_path, "str")
    relay = Relay()
    run = _pair(tmp_path, a, b, relay=relay, secure=False)
    for party in ("active", "passive"):
        assert run[party][0] == 0, run[party][2]
    blob = bytes(relay.recorded["to_active"] + relay.recorded["to_passive"])
    assert b"nonce" in blob and b"reveal" in blob  # plaintext: the handshake is readable
    _no_id_crossed(blob, ids_a + ids_b)


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    a, _, ids_a, _, _ = _tables(tmp_path, "str", dup="yes")
    out = tmp_path / "active.safetensors"
    process = _start("active", a, out, free_port(), _env(tmp_path), "--quiet")
    _error(_finish(process), 2, f"duplicate ids in column 'id': '{ids_a[9]}'")
    assert not out.exists()


def test_different_id_types_are_refused_on_both_sides(tmp_path: Path) -> None:
    a, _, _, _, _ = _tables(tmp_path, "int")
    (tmp_path / "s").mkdir()
    _, b, _, _, _ = _tables(tmp_path / "s", "str")
    run = _pair(tmp_path, a, b)
    for party in ("active", "passive"):
        _error(run[party], 2, "id columns have different types (active int64, passive string)")
    _no_output(run["outs"])


def test_different_secrets_are_refused(tmp_path: Path) -> None:
    a, b, _, _, _ = _tables(tmp_path, "str")
    port, env = free_port(), _env(tmp_path)
    outs = {"active": tmp_path / "active.safetensors", "passive": tmp_path / "passive.safetensors"}
    (tmp_path / "s1").write_text("one secret\n")
    (tmp_path / "s2").write_text("another secret\n")
    active = _start("active", a, outs["active"], port, env, "--quiet", "--secret-file", tmp_path / "s1")
    time.sleep(0.5)
    passive = _start("passive", b, outs["passive"], port, env, "--quiet", "--secret-file", tmp_path / "s2")
    for process in (active, passive):
        _error(_finish(process), 2, "shared secrets (--secret-file) differ")
    _no_output(outs)


@pytest.mark.slow
def test_peer_killed_mid_protocol(tmp_path: Path) -> None:
    """The passive party dies while computing its PSI setup: the active party says so and exits 1."""
    rows = 40_000
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("id\n" + "".join(f"a{i:09d}\n" for i in range(1000)))
    b.write_text("id\n" + "".join(f"b{i:09d}\n" for i in range(rows)))
    port, env = free_port(), _env(tmp_path)
    outs = {"active": tmp_path / "active.safetensors", "passive": tmp_path / "passive.safetensors"}
    passive = _start("passive", b, outs["passive"], port, env, timeout=5)  # the slower reader starts first
    time.sleep(1.0)
    active = _start("active", a, outs["active"], port, env, timeout=5)
    deadline = time.monotonic() + WAIT
    line = ""
    while "connected to the passive party" not in line and time.monotonic() < deadline:
        line = active.stderr.readline()
        assert line or active.poll() is None, "the active party exited before the passive party connected"
    time.sleep(0.3)  # the passive party is now encrypting its 40,000 ids
    assert passive.poll() is None, "the passive party finished too early for this test"
    passive.send_signal(signal.SIGKILL)
    passive.communicate()
    started = time.monotonic()
    code, _, stderr = _finish(active)
    assert time.monotonic() - started < 5 + 3, "the survivor did not notice within the timeout"
    _error((code, "", stderr), 1, "the passive party stopped responding")
    assert "Nothing was written" in stderr
    _no_output(outs)
