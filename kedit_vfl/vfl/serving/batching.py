"""Micro-batching the publisher requests of concurrent HTTP requests.

One embedding request is in flight to the publisher at a time. The rows that HTTP
requests ask for meanwhile queue up, and go together in the next request as soon as the
answer is in: under light load each request travels alone (no waiting for a batch to
fill), under heavy load the batches grow with it and the publisher answers one round
trip per batch instead of one per row. A request gives up waiting at its deadline (the
rows are then scored locally); its answer, when it comes, is simply not used.

The requests run on one thread that owns the channel (the channel is synchronous, and
one owner keeps the request/answer order trivially right); results go back to the
HTTP server's event loop as futures.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import torch

from kedit_vfl.errors import PeerError
from kedit_vfl.vfl.channel.protocol import MAX_ROWS_PER_REQUEST
from kedit_vfl.vfl.config import HEARTBEAT_SECONDS
from kedit_vfl.vfl.serving.link import Connection, PublisherLink
from kedit_vfl.vfl.serving.metrics import ServeMetrics


@dataclass
class _Wanted:
    connection: Connection
    keys: torch.Tensor  # (B,) wire keys of that session
    future: asyncio.Future[torch.Tensor | None]  # None: the session dropped before the publisher answered


class MicroBatcher:
    """Embedding requests from the event loop, sent one batch at a time on a worker thread."""

    def __init__(self, link: PublisherLink, loop: asyncio.AbstractEventLoop, metrics: ServeMetrics) -> None:
        self.link, self.loop, self.metrics = link, loop, metrics
        self._pending: list[_Wanted] = []
        self._wake = threading.Condition()
        self._stopped = False
        self.in_flight_since: float | None = None  # perf_counter() when the current request went out
        self._last_sent = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="kvtool-publisher-batches", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, connection: Connection, keys: torch.Tensor) -> asyncio.Future[torch.Tensor | None]:
        """A future of the embeddings (B, width) of ``keys``, or of None if the session
        drops first (a result, not an exception: nobody may be waiting any more)."""
        future: asyncio.Future[torch.Tensor | None] = self.loop.create_future()
        with self._wake:
            self._pending.append(_Wanted(connection, keys, future))
            self._wake.notify()
        return future

    def late(self, now: float, deadline: float) -> bool:
        """Whether the request in flight has been out longer than a deadline: the publisher is
        lagging, so a new row would wait its whole budget for nothing."""
        since = self.in_flight_since
        return since is not None and now - since > deadline

    def stop(self) -> None:
        """Fail what waits, finish the request in flight, stop the thread."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=self.link.config.timeout + 1.0)

    def _take(self) -> list[_Wanted]:
        """What waits, up to one request's row limit (the rest stays for the next)."""
        taken, rows = [], 0
        while self._pending and rows + len(self._pending[0].keys) <= MAX_ROWS_PER_REQUEST:
            wanted = self._pending.pop(0)
            taken.append(wanted)
            rows += len(wanted.keys)
        return taken

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopped:
                    idle = time.perf_counter() - self._last_sent
                    if idle >= HEARTBEAT_SECONDS:
                        break
                    self._wake.wait(timeout=HEARTBEAT_SECONDS - idle)
                if self._stopped:
                    batch, self._pending = self._pending, []
                    self._fail(batch)
                    return
                batch = self._take()
            connection = self.link.current
            if connection is None:  # no session: nothing to send, no keepalive due until one opens
                self._last_sent = time.perf_counter()
                self._fail(batch)
                continue
            if not batch:
                self._heartbeat(connection)
                continue
            stale = [w for w in batch if w.connection is not connection]  # keys of a dropped session
            self._fail(stale)
            self._send(connection, [w for w in batch if w.connection is connection])

    def _heartbeat(self, connection: Connection) -> None:
        self._last_sent = time.perf_counter()
        try:
            self.link.heartbeat(connection)
        except PeerError as exc:
            self.link.drop(connection, str(exc))

    def _send(self, connection: Connection, batch: list[_Wanted]) -> None:
        if not batch:
            return
        keys = torch.cat([w.keys for w in batch])  # (sum B,)
        started = self.in_flight_since = self._last_sent = time.perf_counter()
        try:
            embeddings = self.link.embed(connection, keys)  # (sum B, width)
        except PeerError as exc:
            self.link.drop(connection, str(exc))
            self._fail(batch)
            return
        finally:
            self.in_flight_since = None
        self.metrics.publisher_seconds.observe(time.perf_counter() - started)
        self.metrics.publisher_batch.observe(len(keys))
        for wanted, part in zip(batch, embeddings.split([len(w.keys) for w in batch]), strict=True):
            self.loop.call_soon_threadsafe(_settle, wanted.future, part)

    def _fail(self, batch: list[_Wanted]) -> None:
        for wanted in batch:
            self.loop.call_soon_threadsafe(_settle, wanted.future, None)


def _settle(future: asyncio.Future[torch.Tensor | None], value: torch.Tensor | None) -> None:
    if not future.done():  # done: the request stopped waiting (its deadline passed)
        future.set_result(value)
