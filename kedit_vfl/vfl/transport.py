"""The wire between the two parties: torch.distributed (gloo, TCP rendezvous, two ranks).

The active party is rank 0 and hosts the rendezvous store on ``HOST:PORT``; the passive
party is rank 1 and connects to it. Every message is a tensor sent point to point;
variable-sized ones are preceded by a fixed four-integer header. Every failure on the
wire (a peer that never comes, dies, or stops answering within ``timeout``) becomes a
:class:`PeerError` with one clear line, so neither side ever hangs.

Byte counters record every payload each way; setting ``KVTOOL_RECORD_TRAFFIC`` to a
folder also keeps a copy of every message sent (the tests' recording transport).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from kedit_vfl.errors import PeerError, UserError

PARTIES = ("active", "passive")
RECORD_ENV = "KVTOOL_RECORD_TRAFFIC"
HEADER_SIZE = 4


@dataclass(frozen=True)
class Rendezvous:
    host: str
    port: int

    def __str__(self) -> str:
        return f"tcp://{self.host}:{self.port}"


def parse_rendezvous(text: str) -> Rendezvous:
    """``tcp://HOST:PORT`` -> Rendezvous; anything else is a user error."""
    parsed = urlparse(text)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != "tcp" or not parsed.hostname or port is None or parsed.path not in ("", "/"):
        raise UserError(f"--rendezvous {text}: expected tcp://HOST:PORT, e.g. tcp://10.0.0.5:29500")
    if not 1 <= port <= 65535:
        raise UserError(f"--rendezvous {text}: port must be between 1 and 65535")
    return Rendezvous(parsed.hostname, port)


def _port_in_use(where: Rendezvous) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed run's TIME_WAIT is no conflict
    try:
        probe.bind(("" if where.host in ("0.0.0.0", "*") else where.host, where.port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    finally:
        probe.close()
    return False


class Channel:
    """Point-to-point messages to the other party, with byte counters.

    ``send``/``recv`` move one tensor each; the receiver must know its shape and dtype
    (the protocol makes that so, with a header where it would not).
    """

    def __init__(self, party: str, where: Rendezvous, timeout: float) -> None:
        self.party, self.where, self.timeout = party, where, timeout
        self.peer_party = "passive" if party == "active" else "active"
        self.bytes_sent = 0
        self.bytes_received = 0
        self._in_flight: list[tuple[Any, torch.Tensor, str]] = []  # sends not yet confirmed
        self._peer_rank = 1 if party == "active" else 0
        self._record: list[dict[str, Any]] | None = [] if os.environ.get(RECORD_ENV) else None
        self._open()

    # -- set-up and tear-down -------------------------------------------------------------
    def _open(self) -> None:
        where, wait = self.where, timedelta(seconds=self.timeout)
        is_server = self.party == "active"
        if is_server and _port_in_use(where):
            raise UserError(
                f"--rendezvous {where}: port {where.port} is already in use on this host; "
                "pick a free port (and give the passive party the same one)"
            )
        try:
            store = dist.TCPStore(
                where.host, where.port, world_size=2, is_master=is_server, timeout=wait, wait_for_workers=True
            )
            dist.init_process_group(
                "gloo", store=store, rank=0 if is_server else 1, world_size=2, timeout=wait
            )
        except (OSError, RuntimeError) as exc:  # DistNetworkError, DistStoreError: before the peer joined
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            if "address already in use" in detail.lower():
                raise UserError(f"--rendezvous {where}: port {where.port} is already in use") from exc
            if is_server:
                raise PeerError(
                    f"the passive party did not connect to {where} within {self.timeout:g} s "
                    "(start it with the same --rendezvous, or raise --timeout)"
                ) from exc
            raise PeerError(
                f"could not reach the active party at {where} within {self.timeout:g} s ({detail}); "
                "start the active party first, or check the host, port and firewall"
            ) from exc
        self._store = store

    def close(self) -> None:
        if self._in_flight and dist.is_initialized():
            try:
                self._confirm_sends()
            except PeerError:
                pass  # closing after a failure: the caller already reports it
        if self._record is not None:
            folder = Path(os.environ[RECORD_ENV])
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self._record, folder / f"{self.party}-{os.getpid()}-{time.time_ns()}.pt")
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- messages ------------------------------------------------------------------------
    def _failed(self, exc: BaseException, doing: str) -> PeerError:
        text = str(exc).lower()
        if "timed out" in text or "timeout" in text:
            why = f"no answer within {self.timeout:g} s"
        else:
            why = "the connection was closed"
        return PeerError(
            f"the {self.peer_party} party stopped responding while {doing} ({why}); "
            "it may have crashed or the network dropped. Restart both parties with --resume "
            "to continue from the last common checkpoint"
        )

    def send(self, tensor: torch.Tensor, what: str = "data") -> None:
        """Queue ``tensor`` for the peer and return at once (messages arrive in order).

        Not waiting for each send lets a request's header and payload travel together:
        a training step then costs one round trip. Sends are confirmed at the next
        :meth:`recv` (by then the peer has answered) or at :meth:`close`.
        """
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() == 0:
            return
        try:
            work = dist.isend(tensor, self._peer_rank)
        except RuntimeError as exc:
            raise self._failed(exc, f"sending {what}") from exc
        self._in_flight = [(w, t, d) for w, t, d in self._in_flight if not w.is_completed()]
        self._in_flight.append((work, tensor, what))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        if self._record is not None:
            self._record.append({"what": what, "tensor": tensor.clone()})

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, what: str = "data") -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel() == 0:
            return tensor
        try:
            dist.recv(tensor, self._peer_rank)
        except RuntimeError as exc:
            raise self._failed(exc, f"waiting for {what}") from exc
        self.bytes_received += tensor.numel() * tensor.element_size()
        self._confirm_sends()
        return tensor

    def _confirm_sends(self) -> None:
        in_flight, self._in_flight = self._in_flight, []
        for work, _, what in in_flight:
            try:
                work.wait()
            except RuntimeError as exc:
                raise self._failed(exc, f"sending {what}") from exc

    def send_header(self, op: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        self.send(torch.tensor([op, a, b, c], dtype=torch.int64), "header")

    def recv_header(self) -> tuple[int, int, int, int]:
        op, a, b, c = self.recv((HEADER_SIZE,), torch.int64, "the next request").tolist()
        return op, a, b, c

    def send_json(self, value: Any, what: str = "message") -> None:
        payload = json.dumps(value, sort_keys=True).encode()
        self.send(torch.tensor([len(payload)], dtype=torch.int64), what)
        self.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), what)

    def recv_json(self, what: str = "message") -> Any:
        (size,) = self.recv((1,), torch.int64, what).tolist()
        payload = self.recv((size,), torch.uint8, what)
        try:
            return json.loads(bytes(payload.numpy()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PeerError(f"the {self.peer_party} party sent a malformed {what}") from exc

    def send_bytes(self, payload: bytes, what: str) -> None:
        self.send(torch.tensor([len(payload)], dtype=torch.int64), what)
        self.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), what)

    def recv_bytes(self, what: str) -> bytes:
        (size,) = self.recv((1,), torch.int64, what).tolist()
        return bytes(self.recv((size,), torch.uint8, what).numpy())

    def traffic(self) -> dict[str, int]:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}


def open_channel(party: str, rendezvous: str, timeout: float) -> Channel:
    if party not in PARTIES:
        raise UserError(f"--party {party}: expected active or passive")
    if timeout <= 0:
        raise UserError(f"--timeout {timeout}: must be positive")
    return Channel(party, parse_rendezvous(rendezvous), timeout)
