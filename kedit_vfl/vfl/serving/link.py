"""The advertiser's session with the publisher, kept open while the server runs.

The link listens on ``--rendezvous`` on a thread of its own, so the HTTP server answers
from the first moment (locally, until the publisher is there). Each connection runs the
same steps as federated ``kvtool vfl score``: mutual TLS between pinned certificates,
the handshake (same two-party run, same model sizes), and the private set intersection
of the advertiser's ``--active`` ids with the publisher's table (or an ``--alignment``).
That gives this session's wire key for each agreed id. When the publisher goes away the
link drops the session and listens again: a publisher that comes back is served
federated again after one handshake and alignment.

Keys belong to one session (they are keyed by its session key), so every embedding
request names the :class:`Connection` its keys came from, and one made for a session
that has since dropped is never sent on the next one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from kedit_vfl.errors import PeerError, UserError
from kedit_vfl.vfl.channel.party import KEY_DTYPE
from kedit_vfl.vfl.channel.protocol import EMBED, FINISH, RemotePassive
from kedit_vfl.vfl.channel.session import connect
from kedit_vfl.vfl.channel.transport import Channel
from kedit_vfl.vfl.config import ServeConfig
from kedit_vfl.vfl.data.encoding import Party
from kedit_vfl.vfl.data.loading import PartyTable
from kedit_vfl.vfl.data.read import open_table, stream_ids
from kedit_vfl.vfl.data.schema import PartySchema
from kedit_vfl.vfl.serving.metrics import ServeMetrics

COMMAND = "serve"
RETRY_SECONDS = 0.5  # pause after a refused or failed connection before listening again


@dataclass(frozen=True)
class Connection:
    """One open session with the publisher."""

    number: int  # 1 for the first session, then one more per reconnection
    channel: Channel
    remote: RemotePassive
    key_of: dict[str, int]  # agreed id -> its wire key in this session

    def keys(self, ids: list[str]) -> list[int | None]:
        return [self.key_of.get(i) for i in ids]


def read_ids(path: Path, id_col: str) -> PartyTable:
    """The advertiser's ids (no features) as the table the alignment runs on."""
    source = open_table(path, "active")
    source.require_column(id_col, "id")
    ids = stream_ids(source, id_col)
    none = torch.zeros((len(ids), 0))
    return PartyTable(Party(ids, none, none.int()), None, PartySchema(), source.path)


class PublisherLink:
    """Connects to the publisher in the background and reconnects after a fault."""

    def __init__(
        self,
        config: ServeConfig,
        table: PartyTable,
        run_id: str | None,
        sizes: dict[str, Any],
        metrics: ServeMetrics,
        log: Callable[[str], None],
    ) -> None:
        self.config, self.table, self.metrics, self.log = config, table, metrics, log
        self.partner, self.width = run_id, int(sizes["out_dim"])
        self.shared = {"model": sizes, "ids_in_clear": config.ids_in_clear}
        self.current: Connection | None = None
        self.known: dict[str, int] = {}  # the last session's agreed ids: why a row falls back while down
        self.sessions = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._dropped = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._keep_connected, name="kvtool-publisher-link", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def _keep_connected(self) -> None:
        while not self._stop.is_set():
            if self.current is not None:
                self._dropped.wait(timeout=1.0)
                self._dropped.clear()
                continue
            try:
                self._connect()
            except (PeerError, UserError, OSError) as exc:
                text = str(exc)
                if "did not connect" not in text:  # nobody came within --timeout: keep listening quietly
                    self.log(f"publisher link: {text}")
                self.last_error = text
                self._stop.wait(RETRY_SECONDS)

    def _connect(self) -> None:
        session, rows, keys = connect(self.config, COMMAND, self.table, self.shared, self.partner, None)
        if self._stop.is_set():
            session.channel.close()
            return
        ids = self.table.rows.ids.take(pa.array(rows.numpy())).to_pylist()
        wire = keys.tolist() if keys is not None else list(range(len(rows)))
        self.sessions += 1
        connection = Connection(self.sessions, session.channel, RemotePassive(session.channel, self.width),
                                dict(zip(ids, wire, strict=True)))  # fmt: skip
        with self._lock:
            self.current = connection
        self.known = connection.key_of
        self.last_error = None
        self.metrics.sessions.inc()
        self.metrics.connected.set(1)
        self.log(f"publisher link: session {connection.number} open, {len(ids):,} agreed ids")

    def embed(self, connection: Connection, keys: torch.Tensor) -> torch.Tensor:
        """The publisher's embeddings (B, width) for these wire keys (the batching thread only).
        The channel checks the answer's size; a NaN or an infinity is refused here."""
        embeddings = connection.remote.embed(keys.to(KEY_DTYPE), train=False)
        if not bool(torch.isfinite(embeddings).all()):
            raise PeerError("protocol error: the publisher sent embeddings that are not finite numbers")
        return embeddings

    def heartbeat(self, connection: Connection) -> None:
        """An empty embedding request: keeps an idle publisher from timing the session out."""
        connection.channel.send_header(EMBED, 0, 0)
        connection.channel.flush("a keepalive")

    def drop(self, connection: Connection, why: str) -> None:
        """The session broke: close it and listen for the publisher again."""
        with self._lock:
            if self.current is not connection:
                return
            self.current = None
        connection.channel.close()
        self.last_error = why
        self.metrics.connected.set(0)
        self.log(
            f"publisher link: session {connection.number} lost ({why}); scoring locally, listening again"
        )
        self._dropped.set()

    def close(self) -> None:
        """Tell the publisher this session ends (it then waits for the next one), stop listening."""
        self._stop.set()
        self._dropped.set()
        with self._lock:
            connection, self.current = self.current, None
        if connection is not None:
            try:
                connection.channel.send_header(FINISH)
                connection.channel.flush("the end of the session")
            except PeerError:
                pass
            connection.channel.close()
        self.metrics.connected.set(0)
