"""Running the advertiser's scoring service: uvicorn, signals, the summary at exit.

- SIGTERM or SIGINT: graceful shutdown. ``/readyz`` turns 503 at once (a load balancer
  stops sending), the listening socket closes, requests in flight finish (up to
  ``--drain-seconds``), then the publisher session ends with a FINISH.
- SIGHUP: reload. ``--model`` (and ``--fallback``) are read again on a worker thread
  while requests go on; the new model is swapped in whole, so every request is answered
  by one model or the other and none is dropped. A file that does not load, or a split
  model of another two-party run, is refused with one line and the old model keeps
  serving. A signal rather than an HTTP endpoint: only the service's own user can send
  it, so reloading needs no authentication scheme of its own.
"""

from __future__ import annotations

import signal
import socket
import time
from typing import Any

from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.vfl.config import ServeConfig


def _listen(host: str, port: int) -> socket.socket:
    """The HTTP socket, bound here so that a taken port is one line, not a uvicorn traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config: ServeConfig, reporter: Reporter = SILENT) -> dict[str, Any]:
    """Serve until SIGTERM/SIGINT; the publisher's side when ``config.party`` is passive."""
    if config.party == "passive":
        from kedit_vfl.vfl.serving.publisher import serve_publisher

        return serve_publisher(config, reporter)
    import torch
    import uvicorn

    from kedit_vfl.seeding import resolve_device
    from kedit_vfl.vfl.serving.app import ServerState, create_app
    from kedit_vfl.vfl.serving.link import PublisherLink, read_ids
    from kedit_vfl.vfl.serving.metrics import ServeMetrics
    from kedit_vfl.vfl.serving.model import load_served

    started = time.perf_counter()
    torch.set_num_threads(1)  # single rows: a second thread only adds hand-offs
    device = resolve_device(config.device)
    served = load_served(config, device)
    metrics = ServeMetrics()
    link = None
    if served.split is not None:
        assert served.sizes is not None
        table = read_ids(config.active, config.id_col)
        link = PublisherLink(config, table, served.run_id, served.sizes, metrics, reporter.warn)
    sock = _listen(config.host, config.port)
    state = ServerState(config, served, metrics, link, device, reporter.warn)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.draining = True  # /readyz says so before the socket closes
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            import asyncio

            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(state.reload()))
            where = f"http://{config.host}:{config.port}"
            reporter.log(f"serving {served.kind} model {served.path} on {where} (OpenAPI: {where}/docs)")

    uv_config = uvicorn.Config(
        create_app(state),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(max(1, round(config.drain_seconds))),
        lifespan="on",
    )
    # uvicorn re-raises a caught SIGTERM/SIGINT after its graceful shutdown, to the handler
    # that was there before: make that a no-op, so the command ends normally with its summary.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Server(uv_config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return {
        "party": "active",
        "model": str(served.path),
        "model_kind": served.kind,
        **state.counts,
        "publisher_sessions": link.sessions if link is not None else 0,
        "reloads": state.reloads,
        "seconds": round(time.perf_counter() - started, 3),
    }
