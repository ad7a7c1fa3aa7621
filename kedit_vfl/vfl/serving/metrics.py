"""What ``kvtool vfl serve`` counts, in Prometheus' format (``GET /metrics``).

One registry per server (not the process-wide default), so a test or an embedding
application can run several. Rows are counted by the path that served them and why;
``kvtool_serve_fallback_ratio`` is the share of recent rows of agreed ids that the
publisher did not answer in time, the figure an operator watches when the publisher is
slow or down (PromQL can also derive rates from the counters).
"""

from __future__ import annotations

import threading
from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# Request latencies around an ad server's budget: sub-millisecond to a second.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 65536)
RATIO_WINDOW = 1000  # rows of agreed ids the fallback ratio looks back over

FEDERATED, LOCAL = "federated", "local"
# Why a row was scored by the local model.
LOCAL_MODEL = "local-model"  # the served model is a local model: no publisher involved
NOT_AGREED = "not-agreed"  # the id is not in the overlap agreed with the publisher
PUBLISHER_DOWN = "publisher-down"  # no session with the publisher, or it broke during the request
DEADLINE = "deadline"  # the publisher's answer did not arrive within --deadline-ms
REASONS = (LOCAL_MODEL, NOT_AGREED, PUBLISHER_DOWN, DEADLINE)


class ServeMetrics:
    """The server's counters, histograms and gauges."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the page for nothing we use
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "kvtool_serve_requests", "HTTP scoring requests by status code", ["status"], registry=registry
        )
        self.latency = Histogram(
            "kvtool_serve_request_seconds",
            "Time to answer a scoring request, from the request parsed to the response built",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rows = Counter(
            "kvtool_serve_rows", "Rows scored, by the path that served them and why", ["path", "reason"],
            registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "kvtool_serve_requests_in_flight", "Scoring requests being answered", registry=registry
        )
        self.publisher_seconds = Histogram(
            "kvtool_serve_publisher_seconds",
            "Round trip of one (micro-batched) embedding request to the publisher",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.publisher_batch = Histogram(
            "kvtool_serve_publisher_batch_rows",
            "Rows per embedding request to the publisher (requests micro-batched together)",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.connected = Gauge(
            "kvtool_serve_publisher_connected",
            "1 while a session with the publisher is open",
            registry=registry,
        )
        self.sessions = Counter(
            "kvtool_serve_publisher_sessions",
            "Sessions opened with the publisher (reconnections)",
            registry=registry,
        )
        self.fallback_ratio = Gauge(
            "kvtool_serve_fallback_ratio",
            f"Share of the last {RATIO_WINDOW} rows of agreed ids that the local model scored",
            registry=registry,
        )
        self.reloads = Counter(
            "kvtool_serve_reloads", "Model reloads (SIGHUP) by result", ["result"], registry=registry
        )
        self._recent: deque[bool] = deque(maxlen=RATIO_WINDOW)
        self._fallbacks = 0
        self._lock = threading.Lock()
        for reason in REASONS:  # every series exists from the start, at zero
            self.rows.labels(LOCAL, reason)
        self.rows.labels(FEDERATED, "")

    def count_rows(self, path: str, reason: str, n: int, agreed: int = 0) -> None:
        """``n`` rows served by ``path`` for ``reason``; ``agreed`` of them had agreed ids."""
        if n:
            self.rows.labels(path, reason).inc(n)
        if agreed:
            self._window(fell_back=path == LOCAL, n=agreed)

    def _window(self, fell_back: bool, n: int) -> None:
        with self._lock:
            for _ in range(min(n, RATIO_WINDOW)):
                if len(self._recent) == RATIO_WINDOW:
                    self._fallbacks -= self._recent[0]
                self._recent.append(fell_back)
                self._fallbacks += fell_back
            self.fallback_ratio.set(self._fallbacks / len(self._recent))

    def exposition(self) -> tuple[bytes, str]:
        """The metrics page and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
