"""A TCP relay between the two parties, for tests and benchmarks: it records every byte
each way and can change, drop, replay or reorder one chunk, as an attacker on the path."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# (direction, chunk, bytes already relayed that way) -> chunks to forward instead
Tamper = Callable[[str, bytes, int], list[bytes]]


@dataclass
class Relay:
    """Listen on a free loopback port; forward each connection to the target port."""

    tamper: Tamper | None = None
    recorded: dict[str, bytearray] = field(
        default_factory=lambda: {"to_active": bytearray(), "to_passive": bytearray()}
    )
    connections: int = 0

    def start(self, target: int) -> int:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)
        return int(self._listener.getsockname()[1])

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            server = self._reach_target()
            if server is None:
                client.close()
                continue
            self.connections += 1
            for source, sink, direction in ((client, server, "to_active"), (server, client, "to_passive")):
                pump = threading.Thread(target=self._pump, args=(source, sink, direction), daemon=True)
                pump.start()
                self._threads.append(pump)

    def _reach_target(self) -> socket.socket | None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self._stopping.is_set():
            try:
                return socket.create_connection(("127.0.0.1", self._target), timeout=1)
            except OSError:
                time.sleep(0.1)
        return None

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        source.settimeout(0.2)
        seen = 0
        try:
            while not self._stopping.is_set():
                try:
                    chunk = source.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                self.recorded[direction] += chunk
                out = self.tamper(direction, chunk, seen) if self.tamper is not None else [chunk]
                seen += len(chunk)
                for piece in out:
                    sink.sendall(piece)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
