"""The micro-batcher of ``kvtool vfl serve``, against a publisher link stand-in (no network)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import torch

from kedit_vfl.errors import PeerError
from kedit_vfl.vfl.serving.batching import MicroBatcher
from kedit_vfl.vfl.serving.metrics import ServeMetrics


class FakeLink:
    """Answers embedding requests with each key repeated (width 2); the first call waits for ``release``."""

    def __init__(self, connected: bool = True) -> None:
        self.current: Any = SimpleNamespace(number=1) if connected else None
        self.config = SimpleNamespace(timeout=2.0)
        self.calls: list[list[int]] = []
        self.release = threading.Event()
        self.fail = False
        self.dropped: list[str] = []
        self.heartbeats = 0

    def embed(self, connection: Any, keys: torch.Tensor) -> torch.Tensor:
        self.calls.append(keys.tolist())
        if len(self.calls) == 1:
            self.release.wait(timeout=5)
        if self.fail:
            raise PeerError("the passive party stopped responding")
        return keys.float().unsqueeze(1).repeat(1, 2)  # (B, 2)

    def heartbeat(self, connection: Any) -> None:
        self.heartbeats += 1

    def drop(self, connection: Any, why: str) -> None:
        self.dropped.append(why)
        self.current = None


async def _batched(link: FakeLink) -> list[Any]:
    batcher = MicroBatcher(link, asyncio.get_running_loop(), ServeMetrics())  # type: ignore[arg-type]
    batcher.start()
    connection = link.current
    first = batcher.submit(connection, torch.tensor([1]))
    while not link.calls:  # the first request is out, its answer held back
        await asyncio.sleep(0.001)
    waiting = [batcher.submit(connection, torch.tensor([10 * k, 10 * k + 1])) for k in range(1, 5)]
    await asyncio.sleep(0.02)
    link.release.set()
    answers = [await first] + [await w for w in waiting]
    batcher.stop()
    return answers


def test_requests_that_arrive_while_one_is_out_go_together() -> None:
    link = FakeLink()
    answers = asyncio.run(_batched(link))
    assert link.calls == [[1], [10, 11, 20, 21, 30, 31, 40, 41]]  # one request for the four waiting
    assert answers[0].tolist() == [[1.0, 1.0]]
    assert answers[2].tolist() == [[20.0, 20.0], [21.0, 21.0]]  # each gets its own rows back


def test_a_broken_session_answers_none_and_drops_the_link() -> None:
    link = FakeLink()
    link.fail = True
    link.release.set()

    async def run() -> Any:
        batcher = MicroBatcher(link, asyncio.get_running_loop(), ServeMetrics())  # type: ignore[arg-type]
        batcher.start()
        answer = await batcher.submit(link.current, torch.tensor([3]))
        later = await batcher.submit(SimpleNamespace(number=1), torch.tensor([4]))  # no session any more
        batcher.stop()
        return answer, later

    answer, later = asyncio.run(run())
    assert answer is None and later is None
    assert link.dropped and link.calls == [[3]]


def test_no_session_costs_no_cpu() -> None:
    """While the publisher is down the batching thread sleeps (it once spun, slowing every request)."""
    link = FakeLink(connected=False)

    async def run() -> float:
        batcher = MicroBatcher(link, asyncio.get_running_loop(), ServeMetrics())  # type: ignore[arg-type]
        batcher.start()
        cpu = time.process_time()
        await asyncio.sleep(1.6)  # past the keepalive interval (1 s), where the spin began
        used = time.process_time() - cpu
        batcher.stop()
        return used

    assert asyncio.run(run()) < 0.15
    assert link.heartbeats == 0


def test_the_link_refuses_embeddings_that_are_not_finite() -> None:
    import pyarrow as pa
    import pytest

    from kedit_vfl.vfl.config import ServeConfig
    from kedit_vfl.vfl.data.encoding import Party
    from kedit_vfl.vfl.data.loading import PartyTable
    from kedit_vfl.vfl.data.schema import PartySchema
    from kedit_vfl.vfl.serving.link import Connection, PublisherLink

    none = torch.zeros((1, 0))
    table = PartyTable(Party(pa.chunked_array([["u1"]]), none, none.int()), None, PartySchema(), "t.csv")
    config = ServeConfig(rendezvous="tcp://127.0.0.1:1", insecure=True)
    link = PublisherLink(config, table, None, {"out_dim": 2}, ServeMetrics(), lambda line: None)
    for bad in (float("nan"), float("inf")):
        remote = SimpleNamespace(embed=lambda keys, train, v=bad: torch.full((len(keys), 2), v))
        connection = Connection(1, None, remote, {"u1": 7})  # type: ignore[arg-type]
        with pytest.raises(PeerError, match="not finite"):
            link.embed(connection, torch.tensor([7]))
    fine = SimpleNamespace(embed=lambda keys, train: torch.ones((len(keys), 2)))
    assert link.embed(Connection(1, None, fine, {}), torch.tensor([7])).shape == (1, 2)  # type: ignore[arg-type]
