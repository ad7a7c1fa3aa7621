"""The advertiser's scoring service: a FastAPI app (OpenAPI schema at ``/openapi.json``).

``POST /score`` takes one row or a batch of rows of the advertiser's features with their
ids and answers a score per row, saying which path served it: ``federated`` (the split
model with the publisher's embedding) or ``local`` and why (``local-model``: the served
model is local; ``not-agreed``: the id is outside the overlap agreed with the publisher;
``publisher-down``; ``deadline``: the publisher did not answer within ``--deadline-ms``).
The local score of every row is computed while the publisher's answer is on its way, so
a late answer costs no more than the deadline. ``GET /healthz`` (alive), ``GET /readyz``
(ready to score; 503 while draining at shutdown) and ``GET /metrics`` (Prometheus).

Every bad request gets a 4xx with one line in ``detail``; nothing a client sends stops
the service.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from kedit_vfl.errors import UserError
from kedit_vfl.vfl.config import ServeConfig
from kedit_vfl.vfl.serving.batching import MicroBatcher
from kedit_vfl.vfl.serving.link import PublisherLink
from kedit_vfl.vfl.serving.metrics import (
    DEADLINE,
    FEDERATED,
    LOCAL,
    LOCAL_MODEL,
    NOT_AGREED,
    PUBLISHER_DOWN,
    ServeMetrics,
)
from kedit_vfl.vfl.serving.model import ServedModel, check_reload, load_served
from kedit_vfl.vfl.serving.requests import (
    BadRequest,
    Row,
    ScoreRequest,
    ScoreResponse,
    check_rows,
    encode_rows,
)

FINISH_SECONDS = 0.001  # of the deadline, kept for the federated head and the response
BODY_BYTES_PER_ROW = 16 * 1024  # a request body may hold this much per row it is allowed


class ServerState:
    """What the endpoints share: the served model (swapped whole on reload), the link."""

    def __init__(
        self,
        config: ServeConfig,
        served: ServedModel,
        metrics: ServeMetrics,
        link: PublisherLink | None,
        device: torch.device,
        log: Callable[[str], None],
    ) -> None:
        self.config, self.served, self.metrics, self.link = config, served, metrics, link
        self.device, self.log = device, log
        self.deadline = config.deadline_ms / 1000.0
        self.batcher: MicroBatcher | None = None
        self.draining = False
        self.counts = {"requests": 0, "rows": 0, "rows_federated": 0, "rows_local_fallback": 0}
        self.reloads = {"ok": 0, "refused": 0}

    # -- scoring --------------------------------------------------------------------------
    async def score(self, rows: list[Row], started: float) -> dict[str, Any]:
        served = self.served  # this request keeps this model, whatever a reload does meanwhile
        if len(rows) > self.config.max_batch:
            raise BadRequest(
                413, f"{len(rows)} rows in one request; at most --max-batch {self.config.max_batch}"
            )
        check_rows(rows, served.schema)
        try:
            num, cat = encode_rows(rows, served.schema)
        except UserError as exc:  # a value the transform refuses: the client's, never the service's
            raise BadRequest(422, str(exc).replace("\n", " ")) from exc
        num, cat = num.to(self.device), cat.to(self.device)
        n, ids = len(rows), [row.id for row in rows]
        reasons = [LOCAL_MODEL] * n
        waiting, agreed = None, []
        if served.split is not None:
            waiting, agreed, reasons = self._ask_publisher(ids, started)
        with torch.inference_mode():
            logits = served.local(num, cat)  # (B,): every row's local score, while the publisher answers
        if waiting is not None:
            budget = started + self.deadline - FINISH_SECONDS - time.perf_counter()
            try:
                embeddings = await asyncio.wait_for(asyncio.shield(waiting), timeout=max(budget, 0.0))
            except TimeoutError:
                embeddings, why = None, DEADLINE
            else:
                why = PUBLISHER_DOWN
            if embeddings is None:
                for i in agreed:
                    reasons[i] = why
            else:
                assert served.split is not None
                at = torch.tensor(agreed, device=self.device)
                with torch.inference_mode():
                    logits[at] = served.split.with_embedding(num[at], cat[at], embeddings.to(self.device))[1]
                for i in agreed:
                    reasons[i] = ""
        scores = torch.sigmoid(logits).tolist()
        results = [
            {"id": i, "score": s, "path": LOCAL if r else FEDERATED, "reason": r or None}
            for i, s, r in zip(ids, scores, reasons, strict=True)
        ]
        self._count(reasons, federated_model=served.split is not None)
        return {"model": served.sha256, "results": results}

    def _ask_publisher(
        self, ids: list[str], started: float
    ) -> tuple[asyncio.Future[torch.Tensor | None] | None, list[int], list[str]]:
        """Send the agreed rows' keys to the publisher (micro-batched); which rows wait, and
        the reason of those that will not."""
        link, batcher = self.link, self.batcher
        connection = link.current if link is not None else None
        if connection is None or batcher is None:
            known = link.known if link is not None else {}
            return None, [], [PUBLISHER_DOWN if (not known or i in known) else NOT_AGREED for i in ids]
        keys = connection.keys(ids)
        agreed = [i for i, key in enumerate(keys) if key is not None]
        reasons = [NOT_AGREED if key is None else DEADLINE for key in keys]
        if not agreed or batcher.late(time.perf_counter(), self.deadline):
            return None, [], reasons  # no agreed row; or the publisher lags: its rows are late already
        wanted = torch.tensor([keys[i] for i in agreed], dtype=torch.int64)
        return batcher.submit(connection, wanted), agreed, reasons

    def _count(self, reasons: list[str], federated_model: bool) -> None:
        counts, metrics = self.counts, self.metrics
        by_reason: dict[str, int] = {}
        for reason in reasons:
            by_reason[reason] = by_reason.get(reason, 0) + 1
        for reason, k in by_reason.items():
            fallback = reason in (DEADLINE, PUBLISHER_DOWN)
            federated = reason == ""
            metrics.count_rows(
                FEDERATED if federated else LOCAL, reason, k, agreed=k if (federated or fallback) else 0
            )
            counts["rows_federated"] += k if federated else 0
            counts["rows_local_fallback"] += k if (federated_model and not federated) else 0
        counts["requests"] += 1
        counts["rows"] += len(reasons)

    # -- reload and readiness ----------------------------------------------------------------
    async def reload(self) -> None:
        """Load ``--model`` again and swap it in; requests in flight finish with the old one."""
        try:
            new = await asyncio.to_thread(load_served, self.config, self.device)
            check_reload(self.served, new)
        except UserError as exc:
            self.reloads["refused"] += 1
            self.metrics.reloads.labels("refused").inc()
            self.log(f"reload refused, still serving {self.served.sha256[:12]}: {exc}")
            return
        self.served = new
        self.reloads["ok"] += 1
        self.metrics.reloads.labels("ok").inc()
        self.log(f"reloaded {new.path}: now serving {new.sha256[:12]}")

    def readiness(self) -> dict[str, Any]:
        served, link = self.served, self.link
        connection = link.current if link is not None else None
        return {
            "ready": not self.draining,
            "model": served.sha256,
            "kind": served.kind,
            "local_scorer": served.local_name,
            "publisher": "none"
            if link is None
            else ("connected" if connection is not None else "disconnected"),
            "agreed_ids": len(connection.key_of) if connection is not None else None,
            "sessions": link.sessions if link is not None else 0,
            "deadline_ms": self.config.deadline_ms,
            "reloads": dict(self.reloads),
        }


def _one_line(error: dict[str, Any]) -> str:
    """A pydantic error as one line: where in the body, and what was wrong."""
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    message = str(error.get("msg", "invalid"))[:200]
    if not loc:
        return 'the body must be a JSON object {"rows": [...]}, sent as Content-Type: application/json'
    if len(loc) >= 4 and loc[0] == "rows" and loc[2] == "features":
        return f"row {loc[1]}: feature '{loc[3][:80]}' must be a number, a string or null"
    if len(loc) >= 2 and loc[0] == "rows" and loc[1].isdigit():
        return f"row {loc[1]}: {'.'.join(loc[2:]) or 'the row'}: {message}"
    return f"{'.'.join(loc)}: {message}"


class _BodyLimit:
    """Refuses a request body beyond ``limit`` bytes (413) before it is read whole."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _too_large(self.limit)(scope, receive, send)


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(
        {"detail": f"request body larger than {limit:,} bytes; send fewer rows"}, status_code=413
    )


def create_app(state: ServerState) -> Any:
    """The ASGI app: routes, one-line errors, the body limit, the publisher link's lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.link is not None:
            state.batcher = MicroBatcher(state.link, asyncio.get_running_loop(), state.metrics)
            state.batcher.start()
            state.link.start()
        try:
            yield
        finally:
            if state.batcher is not None:
                await asyncio.to_thread(state.batcher.stop)
            if state.link is not None:
                state.link.close()

    app = FastAPI(
        title="kvtool vfl serve",
        summary="VFed-SSD scoring: the advertiser's rows, federated with the publisher or local.",
        lifespan=lifespan,
    )
    metrics = state.metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            status, detail = (
                400,
                f"malformed JSON: {str(first.get('ctx', {}).get('error', 'cannot parse'))[:200]}",
            )
        else:
            status, detail = 422, _one_line(first)
        metrics.requests.labels(str(status)).inc()
        return JSONResponse({"detail": detail}, status_code=status)

    @app.post(
        "/score",
        response_model=None,
        responses={
            200: {"model": ScoreResponse, "description": "A score per row, in the request's order"},
            400: {"description": "Malformed JSON"},
            413: {"description": "More rows than --max-batch, or too large a body"},
            422: {"description": "A row that does not fit the model (missing, unknown or mistyped feature)"},
        },
    )
    async def score(request: ScoreRequest) -> Response:
        """Score one row or a batch of rows of the advertiser's features."""
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            result = await state.score(request.rows, started)
        except BadRequest as exc:
            metrics.requests.labels(str(exc.status)).inc()
            return JSONResponse({"detail": exc.message}, status_code=exc.status)
        finally:
            metrics.in_flight.dec()
        metrics.latency.observe(time.perf_counter() - started)
        metrics.requests.labels("200").inc()
        return JSONResponse(result)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 200 while scoring (with or without the publisher), 503 while draining."""
        ready = state.readiness()
        return JSONResponse(ready, status_code=200 if ready["ready"] else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Counters and histograms in Prometheus' text format."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return _BodyLimit(app, limit=1024 + state.config.max_batch * BODY_BYTES_PER_ROW)
