"""Overlapping the stages of a stream on the machine's cores.

A table is read, encoded, scored and written batch by batch. Arrow's reader, NumPy's
element-wise functions, PyTorch's kernels and Arrow's writers all release the GIL, so
running the stages on their own threads keeps every core busy: the next batch is
encoded while this one is scored, and the last one is written behind it. Each stage
holds at most a few batches, so memory stays bounded.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items``, produced on a background thread up to ``depth`` ahead of the consumer.

    An exception in the producer is raised in the consumer at the item where it happened;
    a consumer that stops early stops the producer too.
    """
    ready: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((None, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="kvtool-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class Behind:
    """Calls run one at a time on one background thread, at most one waiting to finish:
    the caller goes on with the next batch while the last one is, say, written."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtool-behind")
        self._pending: Future[Any] | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Until the last call finishes; its exception, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> Behind:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)  # a call still running finishes; its error is the caller's to fetch
