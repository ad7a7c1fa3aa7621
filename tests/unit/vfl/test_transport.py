"""The two-party channel in one process: two threads, one per party, over 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kedit_vfl.errors import PeerError, UserError
from kedit_vfl.vfl.channel import protocol
from kedit_vfl.vfl.channel.identity import generate_identity, load_certificate, load_identity
from kedit_vfl.vfl.channel.security import Security, check_security, is_loopback, parse_rendezvous
from kedit_vfl.vfl.channel.transport import FRAME, Channel, open_channel


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("identities")
    for name in ("active", "passive", "stranger"):
        generate_identity(folder / name, name)
    return folder


def _security(ids: Path, me: str, peer: str) -> Security:
    return Security(identity=ids / me, peer_cert=ids / peer / "cert.pem")


def _pair(
    active: Security,
    passive: Security,
    run_active: Callable[[Channel], Any],
    run_passive: Callable[[Channel], Any],
    timeout: float = 5.0,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Both parties' results (or the exception each raised)."""
    where, out = f"tcp://127.0.0.1:{_free_port()}", {}

    def party(name: str, security: Security, run: Callable[[Channel], Any]) -> None:
        try:
            with open_channel(name, where, timeout, security, deadline=deadline) as channel:
                out[name] = run(channel)
        except Exception as exc:  # the test looks at what each side raised
            out[name] = exc

    threads = [
        threading.Thread(target=party, args=("active", active, run_active)),
        threading.Thread(target=party, args=("passive", passive, run_passive)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return out


@pytest.mark.parametrize("secure", [True, False])
def test_messages_round_trip(ids: Path, secure: bool) -> None:
    sec = (_security(ids, "active", "passive"), _security(ids, "passive", "active")) if secure else (
        Security(insecure=True), Security(insecure=True))  # fmt: skip

    def active(channel: Channel) -> Any:
        channel.send(torch.arange(12, dtype=torch.float32).reshape(3, 4), "floats")
        channel.send_json({"hello": [1, 2]}, "json")
        channel.send_bytes(b"\x00\x01payload", "bytes")
        return channel.recv((2,), torch.int64, "answer"), channel.peer_fingerprint, channel.encrypted

    def passive(channel: Channel) -> Any:
        floats = channel.recv((3, 4), torch.float32, "floats")
        message = channel.recv_json("json")
        raw = channel.recv_bytes("bytes", 100)
        channel.send(torch.tensor([7, 8]), "answer")
        return floats, message, raw

    out = _pair(*sec, active, passive)
    floats, message, raw = out["passive"]
    assert torch.equal(floats, torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert message == {"hello": [1, 2]} and raw == b"\x00\x01payload"
    answer, fingerprint, encrypted = out["active"]
    assert answer.tolist() == [7, 8] and encrypted is secure
    if secure:
        assert fingerprint == load_identity(ids / "passive").fingerprint


def test_a_stranger_is_refused_by_both_sides(ids: Path) -> None:
    """The passive side presents a certificate the active party did not pin: nothing crosses."""

    def never(channel: Channel) -> Any:
        return channel.recv_json("handshake")  # the active party speaks first, once it trusts its peer

    out = _pair(
        _security(ids, "active", "passive"), _security(ids, "stranger", "active"), never, never, timeout=3
    )
    assert isinstance(out["active"], PeerError) and "refused 1 connection" in str(out["active"])
    assert isinstance(out["passive"], PeerError)
    out = _pair(  # and the other way round: the passive party pinned someone else
        _security(ids, "active", "passive"), _security(ids, "passive", "stranger"), never, never, timeout=3
    )
    assert isinstance(out["passive"], PeerError) and "pinned" in str(out["passive"])
    assert isinstance(out["active"], PeerError)


def test_plaintext_meets_tls_is_refused(ids: Path) -> None:
    out = _pair(
        _security(ids, "active", "passive"), Security(insecure=True), lambda c: 1, lambda c: 1, timeout=3
    )
    assert isinstance(out["passive"], PeerError) and isinstance(out["active"], PeerError)
    assert "--insecure" in str(out["active"])


@pytest.mark.parametrize("claim", [2 << 30, 1 << 40])
def test_oversized_claims_are_refused_before_allocation(claim: int) -> None:
    def active(channel: Channel) -> None:
        channel._socket().sendall(FRAME.pack(claim) + b"{}")
        channel.recv((1,), torch.int64, "nothing")  # waits until the peer hangs up

    def passive(channel: Channel) -> Any:
        return channel.recv_json("handshake")

    out = _pair(Security(insecure=True), Security(insecure=True), active, passive, timeout=3)
    assert isinstance(out["passive"], PeerError)
    assert f"announced {claim:,} bytes of handshake, more than the 1,048,576 allowed" in str(out["passive"])


def test_a_frame_of_the_wrong_size_is_a_protocol_error() -> None:
    def active(channel: Channel) -> None:
        channel.send(torch.zeros(5), "embeddings")
        channel.flush()

    def passive(channel: Channel) -> Any:
        return channel.recv((4,), torch.float32, "embeddings")

    out = _pair(Security(insecure=True), Security(insecure=True), active, passive)
    assert isinstance(out["passive"], PeerError) and "20 bytes of embeddings, 16 were expected" in str(
        out["passive"]
    )


def test_silence_and_the_deadline_end_the_wait() -> None:
    def silent(channel: Channel) -> None:
        threading.Event().wait(2.5)

    def waits(channel: Channel) -> Any:
        return channel.recv((1,), torch.int64, "a request")

    out = _pair(Security(insecure=True), Security(insecure=True), silent, waits, timeout=1)
    assert isinstance(out["passive"], PeerError) and "no answer within 1 s" in str(out["passive"])
    out = _pair(Security(insecure=True), Security(insecure=True), silent, waits, timeout=5, deadline=1.5)
    assert isinstance(out["passive"], PeerError) and "--deadline" in str(out["passive"])


def test_session_keys_agree_and_are_fresh(ids: Path) -> None:
    def run(channel: Channel) -> bytes:
        summary = {"rows": 3}
        return protocol.handshake(channel, "align", {"x": 1}, summary, None, None, None).key

    first = _pair(_security(ids, "active", "passive"), _security(ids, "passive", "active"), run, run)
    second = _pair(_security(ids, "active", "passive"), _security(ids, "passive", "active"), run, run)
    assert first["active"] == first["passive"] and len(first["active"]) == 32
    assert second["active"] == second["passive"] != first["active"]


def test_malformed_handshake_fields_are_peer_faults() -> None:
    def active(channel: Channel) -> None:
        hello = {"protocol": protocol.PROTOCOL_VERSION, "party": "active", "command": "align",
                 "nonce": "zz", "exchange": 5}  # fmt: skip
        channel.send_json(hello, "handshake")
        channel.recv_json("handshake")

    def passive(channel: Channel) -> Any:
        return protocol.handshake(channel, "align", {}, {"rows": 1}, None, None, None)

    out = _pair(Security(insecure=True), Security(insecure=True), active, passive)
    assert isinstance(out["passive"], PeerError) and "handshake has no valid 'exchange'" in str(
        out["passive"]
    )


class _Requests:
    """A stand-in channel that hands ``serve`` one request header."""

    def __init__(self, header: tuple[int, int, int, int]) -> None:
        self.header = header

    def recv_header(self) -> tuple[int, int, int, int]:
        return self.header

    def recv(self, *args: object) -> None:
        raise AssertionError("serve read a payload it should have refused")


def test_requests_over_the_row_cap_are_refused_before_reading() -> None:
    header = (protocol.EMBED, protocol.MAX_ROWS_PER_REQUEST + 1, 0, 0)
    with pytest.raises(PeerError, match="asked for 65,537 rows in one request"):
        protocol.serve(_Requests(header), party=None)  # type: ignore[arg-type]
    with pytest.raises(PeerError, match="unknown request 99"):
        protocol.serve(_Requests((99, 0, 0, 0)), party=None)  # type: ignore[arg-type]


def test_security_is_checked_before_any_wait(ids: Path) -> None:
    remote = parse_rendezvous("tcp://10.1.2.3:29500")
    with pytest.raises(UserError, match="--identity DIR .* and --peer-cert FILE"):
        check_security(Security(), remote)
    with pytest.raises(UserError, match="10.1.2.3 is not a loopback address"):
        check_security(Security(insecure=True), remote)
    with pytest.raises(UserError, match="--peer-cert FILE"):
        check_security(Security(identity=ids / "active"), parse_rendezvous("tcp://127.0.0.1:1"))
    check_security(Security(insecure=True), parse_rendezvous("tcp://localhost:1"))
    assert is_loopback("127.0.0.5") and is_loopback("::1") and not is_loopback("10.0.0.1")


def test_identity_files_are_checked(ids: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="already holds an identity"):
        generate_identity(ids / "active", "again")
    assert (ids / "active" / "key.pem").stat().st_mode & 0o777 == 0o600
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(UserError, match="not a PEM certificate"):
        load_certificate(tmp_path / "bad.pem")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "key.pem").write_bytes((ids / "active" / "key.pem").read_bytes())
    (mixed / "cert.pem").write_bytes((ids / "passive" / "cert.pem").read_bytes())
    with pytest.raises(UserError, match="do not belong together"):
        load_identity(mixed)


def test_keepalives_reach_the_waiting_party_during_long_work() -> None:
    """Work longer than the timeout: queued messages and keepalives go out while it runs."""
    import time

    from kedit_vfl.vfl.channel import alignment

    def works(channel: Channel) -> int:
        channel.send_json({"before": "the work"}, "notice")
        return alignment._work(channel, lambda: time.sleep(2.5) or 7)

    def waits(channel: Channel) -> dict:
        notice = channel.recv_json("notice")
        alignment._wait(channel, "the other party's work")
        return notice

    out = _pair(Security(insecure=True), Security(insecure=True), works, waits, timeout=1)
    assert out == {"active": 7, "passive": {"before": "the work"}}


def test_a_silent_connection_does_not_hold_the_place_of_the_real_peer(
    ids: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone connects first and says nothing: the active party drops it and still
    accepts the real passive party within the timeout."""
    from kedit_vfl.vfl.channel import transport

    monkeypatch.setattr(transport, "GREETING_SECONDS", 1.0)
    port = _free_port()
    where = f"tcp://127.0.0.1:{port}"
    out: dict[str, Any] = {}

    def active() -> None:
        try:
            with open_channel("active", where, 8, _security(ids, "active", "passive")) as channel:
                channel.send_json({"hello": 1}, "hello")
                out["active"] = channel.recv_json("answer")
        except Exception as exc:  # the test looks at what it raised
            out["active"] = exc

    thread = threading.Thread(target=active)
    thread.start()
    silent = None
    for _ in range(50):
        try:
            silent = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            threading.Event().wait(0.1)
    try:
        with open_channel("passive", where, 8, _security(ids, "passive", "active")) as channel:
            assert channel.recv_json("hello") == {"hello": 1}
            channel.send_json({"ok": True}, "answer")
            channel.flush()
        thread.join(15)
    finally:
        if silent is not None:
            silent.close()
    assert out["active"] == {"ok": True}
