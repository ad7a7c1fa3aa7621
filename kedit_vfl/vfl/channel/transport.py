"""The wire between the two parties: one TCP connection under mutual TLS 1.3.

The active party listens on ``HOST:PORT``; the passive party connects to it. Both hold
their own key and certificate (``kvtool vfl keygen``) and pin the other's certificate
(``--peer-cert``): the TLS handshake refuses any other peer before a byte of the
protocol crosses, and TLS gives confidentiality, integrity and replay/reorder protection
of every message (Python's ``ssl``; no cryptography is written here). Python's ``ssl``
was measured against gRPC for our message shapes (``benchmarks/vfl_transport_choice.py``):
2.7x the round trips of gRPC with the same certificates for a training step.

``--insecure`` drops TLS (and so authentication); it is refused unless the address is a
loopback address, so it can never carry data between machines.

Every message is a frame: an 8-byte length, then the payload. The receiver always knows
how much it expects (or a cap for variable-sized messages) and refuses a longer claim
before reading or allocating anything. Every wait is bounded by ``timeout`` and, where
one is set, by an overall ``deadline``. Every failure on the wire becomes a
:class:`PeerError` with one line, so neither side ever hangs or prints a traceback.
"""

from __future__ import annotations

import errno
import json
import socket
import ssl
import struct
import time
from typing import Any

import torch

from kedit_vfl.errors import PeerError, UserError
from kedit_vfl.vfl.channel.security import Rendezvous, Security, check_security, parse_rendezvous

PARTIES = ("active", "passive")
HEADER_SIZE = 4  # int64 fields of a request header
FRAME = struct.Struct(">Q")  # payload length of one message
MAX_JSON_BYTES = 1 << 20  # handshake and result messages are a few KB
INSECURE_PREFACE = b"KVTOOL-INSECURE/1\n"  # what each side says first without TLS
FLUSH_BYTES = 1 << 20  # queued sends beyond this go out at once
GREETING_SECONDS = 10.0  # how long the listening party waits for a connection's TLS greeting


def _tls_context(security: Security, server: bool) -> tuple[ssl.SSLContext, str]:
    """A TLS 1.3 context that presents this party's certificate and trusts only the peer's."""
    from kedit_vfl.vfl.channel.identity import load_certificate, load_identity

    assert security.identity is not None and security.peer_cert is not None
    identity = load_identity(security.identity)
    peer_pem, peer_fingerprint = load_certificate(security.peer_cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(identity.cert, identity.key)
    context.load_verify_locations(cadata=peer_pem.decode("ascii", "replace"))
    context.verify_mode = ssl.CERT_REQUIRED
    if not server:
        context.check_hostname = False  # the peer is recognised by its pinned certificate, not a name
    return context, peer_fingerprint


def _port_in_use(where: Rendezvous) -> bool:
    probe = socket.socket(socket.AF_INET6 if ":" in where.host else socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed run's TIME_WAIT is no conflict
    try:
        probe.bind(("" if where.host in ("0.0.0.0", "*") else where.host, where.port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    finally:
        probe.close()
    return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc.__class__.__name__}".replace("_", " ").lower()
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return text


class Channel:
    """Framed messages to the other party over one authenticated connection.

    ``send`` queues a message and returns; queued messages go out together at the next
    :meth:`recv`, :meth:`flush` or :meth:`close`, so a request's header and payload
    travel as one write and a training step costs one round trip.
    """

    def __init__(
        self,
        party: str,
        where: Rendezvous,
        timeout: float,
        security: Security,
        *,
        hint: str = "start both parties again",
        deadline: float | None = None,
    ) -> None:
        self.party, self.where, self.timeout, self.hint = party, where, timeout, hint
        self.peer_party = "passive" if party == "active" else "active"
        self.deadline = time.monotonic() + deadline if deadline is not None else None
        self.deadline_seconds = deadline
        self.bytes_sent = 0
        self.bytes_received = 0
        self.peer_fingerprint: str | None = None
        self.encrypted = not security.insecure
        self._outbox: list[bytes | memoryview] = []
        self._outbox_bytes = 0
        self._sock: socket.socket | None = None
        self._sock = self._open(security)

    # -- set-up and tear-down -------------------------------------------------------------
    def _left(self, limit: float) -> float:
        if self.deadline is None:
            return limit
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PeerError(
                f"the run with the {self.peer_party} party did not finish within its deadline "
                f"({self.deadline_seconds:g} s); raise --deadline if the tables are that large"
            )
        return min(limit, left)

    def _open(self, security: Security) -> socket.socket:
        if security.insecure:
            context, fingerprint = None, None
        else:
            context, fingerprint = _tls_context(security, self.party == "active")
        if self.party == "active":
            sock = self._accept(context, fingerprint)
        else:
            sock = self._connect(context, fingerprint)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer_fingerprint = fingerprint
        return sock

    def _accept(self, context: ssl.SSLContext | None, fingerprint: str | None) -> socket.socket:
        """Wait for the passive party; refuse (and keep waiting past) anyone else."""
        where = self.where
        if _port_in_use(where):
            raise UserError(
                f"--rendezvous {where}: port {where.port} is already in use on this host; "
                "pick a free port (and give the passive party the same one)"
            )
        host = "" if where.host in ("0.0.0.0", "*") else where.host
        try:
            listener = socket.create_server((host, where.port), family=_family(where.host))
        except OSError as exc:
            raise UserError(f"--rendezvous {where}: cannot listen there ({_reason(exc)})") from exc
        refused: list[str] = []
        give_up = time.monotonic() + self.timeout
        with listener:
            while True:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise PeerError(self._nobody_came(refused))
                listener.settimeout(self._left(left))
                try:
                    conn, address = listener.accept()
                except TimeoutError:
                    continue
                # A connection that stays silent is dropped after a few seconds, so it cannot
                # hold the place of the real passive party (queued behind it) for long.
                conn.settimeout(self._left(min(max(left, 1.0), GREETING_SECONDS)))
                try:
                    return self._greet(conn, context, fingerprint, server=True)
                except _Refused as exc:
                    conn.close()
                    refused.append(f"{address[0]}: {exc}")

    def _nobody_came(self, refused: list[str]) -> str:
        text = (
            f"the passive party did not connect to {self.where} within {self.timeout:g} s "
            "(start it with the same --rendezvous, or raise --timeout)"
        )
        if refused:
            text += f"; refused {len(refused)} connection(s), the last from {refused[-1]}"
        return text

    def _connect(self, context: ssl.SSLContext | None, fingerprint: str | None) -> socket.socket:
        """Reach the active party, retrying until it listens or ``timeout`` passes."""
        give_up, last = time.monotonic() + self.timeout, "no answer"
        while True:
            left = give_up - time.monotonic()
            if left <= 0:
                raise PeerError(
                    f"could not reach the active party at {self.where} within {self.timeout:g} s ({last}); "
                    "start the active party first, or check the host, port and firewall"
                )
            try:
                conn = socket.create_connection((self.where.host, self.where.port), timeout=self._left(left))
            except OSError as exc:
                last = _reason(exc)
                time.sleep(min(0.2, max(left, 0)))
                continue
            conn.settimeout(self._left(self.timeout))
            try:
                return self._greet(conn, context, fingerprint, server=False)
            except _Refused as exc:
                conn.close()
                raise PeerError(f"refused the party at {self.where}: {exc}") from None

    def _greet(
        self, conn: socket.socket, context: ssl.SSLContext | None, fingerprint: str | None, server: bool
    ) -> socket.socket:
        """TLS handshake and certificate pin, or the insecure preface; raise _Refused."""
        if context is None:
            try:
                conn.sendall(INSECURE_PREFACE)
                got = _read_exactly(conn, len(INSECURE_PREFACE))
            except (OSError, EOFError) as exc:
                raise _Refused(
                    "it closed the connection during set-up (do both parties run with --insecure?)"
                ) from exc
            if got != INSECURE_PREFACE:
                raise _Refused("it speaks TLS or another protocol; give both parties --insecure, or neither")
            return conn
        if server:
            try:
                first = conn.recv(len(INSECURE_PREFACE), socket.MSG_PEEK)
            except OSError as exc:
                raise _Refused(_reason(exc)) from exc
            if first.startswith(INSECURE_PREFACE[:6]):
                raise _Refused("it runs with --insecure (no TLS); give both parties --insecure, or neither")
        try:
            tls = context.wrap_socket(conn, server_side=server)
        except ssl.SSLCertVerificationError as exc:
            raise _Refused(
                "it presented a certificate other than the pinned one (--peer-cert " + str(fingerprint) + ")"
            ) from exc
        except ssl.SSLError as exc:
            if "certificate" in str(exc).lower():
                raise _Refused(f"certificate refused ({_reason(exc)}); check --peer-cert on both") from exc
            raise _Refused(f"the TLS handshake failed ({_reason(exc)}); is it kvtool with TLS?") from exc
        except (OSError, EOFError) as exc:
            raise _Refused(f"the TLS handshake failed ({_reason(exc)}); is it kvtool with TLS?") from exc
        from kedit_vfl.vfl.channel.identity import fingerprint_der

        der = tls.getpeercert(binary_form=True)
        if der is None or fingerprint_der(der) != fingerprint:
            tls.close()
            raise _Refused(f"its certificate is not the pinned one (--peer-cert {fingerprint})")
        return tls

    def close(self) -> None:
        if self._sock is None:
            return
        try:
            if self._outbox:
                self.flush()
        except PeerError:
            pass  # closing after a failure: the caller already reports it
        try:
            self._sock.close()
        except OSError:
            pass
        self._sock = None

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- messages ------------------------------------------------------------------------
    def _failed(self, exc: BaseException, doing: str) -> PeerError:
        if isinstance(exc, TimeoutError) and self.deadline is not None and time.monotonic() >= self.deadline:
            return PeerError(
                f"the run with the {self.peer_party} party did not finish within its deadline "
                f"({self.deadline_seconds:g} s, while {doing}); raise --deadline if the tables are that large"
            )
        if isinstance(exc, TimeoutError):
            why = f"no answer within {self.timeout:g} s"
        elif isinstance(exc, ssl.SSLError) and "certificate" in str(exc).lower():
            return PeerError(
                f"the {self.peer_party} party refused this party's certificate ({_reason(exc)}); "
                "it must pin this party's cert.pem with --peer-cert"
            )
        elif isinstance(exc, ssl.SSLError):
            why = f"{_reason(exc)}: the connection was tampered with or broken"
        else:
            why = "the connection was closed"
        return PeerError(
            f"the {self.peer_party} party stopped responding while {doing} ({why}); "
            f"it may have crashed or the network dropped. {self.hint[:1].upper()}{self.hint[1:]}"
        )

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise PeerError(f"the connection to the {self.peer_party} party is closed")
        return self._sock

    def send_raw(self, payload: bytes | memoryview, what: str = "data") -> None:
        """Queue one framed message."""
        self._outbox.append(FRAME.pack(len(payload)))
        self._outbox.append(payload)
        self._outbox_bytes += FRAME.size + len(payload)
        self.bytes_sent += FRAME.size + len(payload)
        if self._outbox_bytes >= FLUSH_BYTES:
            self.flush(what)

    def flush(self, what: str = "data") -> None:
        """Send everything queued now."""
        if not self._outbox:
            return
        sock = self._socket()
        data, self._outbox, self._outbox_bytes = b"".join(self._outbox), [], 0
        try:
            sock.settimeout(self._left(self.timeout))
            sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            raise self._failed(exc, f"sending {what}") from exc

    def send(self, tensor: torch.Tensor, what: str = "data") -> None:
        """Queue ``tensor``'s bytes for the peer (the peer knows its shape and dtype)."""
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() == 0:
            return
        self.send_raw(memoryview(tensor.numpy()).cast("B").tobytes(), what)

    def _read_into(self, view: memoryview, what: str) -> None:
        sock, got = self._socket(), 0
        try:
            while got < len(view):
                sock.settimeout(self._left(self.timeout))
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("closed")
                got += n
        except (OSError, ssl.SSLError) as exc:
            raise self._failed(exc, f"waiting for {what}") from exc
        self.bytes_received += len(view)

    def _frame(self, what: str, exactly: int | None = None, at_most: int | None = None) -> int:
        """Read one frame's length and check it before anything is allocated."""
        self.flush(what)
        header = bytearray(FRAME.size)
        self._read_into(memoryview(header), what)
        (size,) = FRAME.unpack(header)
        if exactly is not None and size != exactly:
            raise PeerError(
                f"protocol error: the {self.peer_party} party sent {size:,} bytes of {what}, "
                f"{exactly:,} were expected"
            )
        if at_most is not None and size > at_most:
            raise PeerError(
                f"protocol error: the {self.peer_party} party announced {size:,} bytes of {what}, "
                f"more than the {at_most:,} allowed"
            )
        return size

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, what: str = "data") -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel() == 0:
            return tensor
        size = tensor.numel() * tensor.element_size()
        self._frame(what, exactly=size)
        self._read_into(memoryview(tensor.numpy()).cast("B"), what)
        return tensor

    def recv_raw(self, what: str, at_most: int) -> bytes:
        size = self._frame(what, at_most=at_most)
        payload = bytearray(size)
        if size:
            self._read_into(memoryview(payload), what)
        return bytes(payload)

    def send_header(self, op: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        self.send(torch.tensor([op, a, b, c], dtype=torch.int64), "header")

    def recv_header(self) -> tuple[int, int, int, int]:
        op, a, b, c = self.recv((HEADER_SIZE,), torch.int64, "the next request").tolist()
        return op, a, b, c

    def send_json(self, value: Any, what: str = "message") -> None:
        self.send_raw(json.dumps(value, sort_keys=True).encode(), what)

    def recv_json(self, what: str = "message", at_most: int = MAX_JSON_BYTES) -> dict[str, Any]:
        """A JSON object from the peer; anything else is a protocol error."""
        payload = self.recv_raw(what, at_most)
        try:
            value = json.loads(payload.decode())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise PeerError(f"protocol error: the {self.peer_party} party sent a malformed {what}") from exc
        if not isinstance(value, dict):
            raise PeerError(f"protocol error: the {self.peer_party} party sent a malformed {what}")
        return value

    def send_bytes(self, payload: bytes, what: str) -> None:
        self.send_raw(payload, what)

    def recv_bytes(self, what: str, at_most: int) -> bytes:
        return self.recv_raw(what, at_most)

    def traffic(self) -> dict[str, int]:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}


class _Refused(Exception):
    """A connection attempt that failed authentication or set-up (one line)."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError("closed")
        data += chunk
    return data


def open_channel(
    party: str,
    rendezvous: str,
    timeout: float,
    security: Security,
    *,
    hint: str = "start both parties again",
    deadline: float | None = None,
) -> Channel:
    """Check the options, then connect (active: listen) and authenticate the peer."""
    if party not in PARTIES:
        raise UserError(f"--party {party}: expected active or passive")
    if timeout <= 0:
        raise UserError(f"--timeout {timeout}: must be positive")
    where = parse_rendezvous(rendezvous)
    check_security(security, where)
    return Channel(party, where, timeout, security, hint=hint, deadline=deadline)
