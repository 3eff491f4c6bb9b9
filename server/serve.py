"""Run the gateway under uvicorn: the API on ``gateway_port`` and, when ``metrics_port`` is set, ``/metrics`` on
that port only.

``/metrics`` names tenants and adapters and counts their tokens: it is for Prometheus, not for the public.
With ``FLYLORA_METRICS_PORT`` set the public port answers ``/metrics`` with 404, and a second listener (same
process, same event loop, same metric registry) serves it, on ``FLYLORA_METRICS_HOST`` (default the gateway's
address); docker-compose and the Kubernetes manifests publish only the API port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.settings import Settings

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def metrics_app(main: Any) -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    """A bare ASGI app: ``GET /metrics`` from ``main``'s gateway; 404 for anything else, 503 before start-up."""

    async def app(scope: dict[str, Any], _receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        gw = getattr(main.state, "gateway", None)
        if scope["path"] != "/metrics" or scope["method"] not in ("GET", "HEAD"):
            status, body, kind = 404, b'{"error": {"message": "Not Found", "type": "invalid_request_error", ' \
                                       b'"param": null, "code": null}}', b"application/json"
        elif gw is None:
            status, body, kind = 503, b"starting\n", b"text/plain"
        else:
            status, body, kind = 200, generate_latest(gw.metrics.registry), CONTENT_TYPE_LATEST.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    return app


class _SideServer(uvicorn.Server):
    """The metrics listener: the main server owns the signal handlers and stops this one when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_both(main: uvicorn.Server, side: _SideServer) -> None:
    side_task = asyncio.ensure_future(side.serve())
    while not side.started:
        if side_task.done():
            with contextlib.suppress(BaseException):
                side_task.result()
            raise SystemExit(f"flylora-gateway: cannot listen on the metrics port {side.config.port}")
        await asyncio.sleep(0.02)
    try:
        await main.serve()
    finally:
        side.should_exit = True
        await side_task


def run(app: Any, settings: Settings, *, log_level: str = "info", access_log: bool = False) -> None:
    """Serve until stopped (SIGINT/SIGTERM): requests in flight then get ``shutdown_grace_s`` to finish."""
    common = {"log_level": log_level, "server_header": False, "proxy_headers": False}
    main_config = uvicorn.Config(app, host=settings.gateway_host, port=settings.gateway_port, access_log=access_log,
                                 timeout_graceful_shutdown=settings.shutdown_grace_s, **common)
    if settings.metrics_port is None:
        uvicorn.Server(main_config).run()
        return
    side_config = uvicorn.Config(metrics_app(app), host=settings.metrics_host or settings.gateway_host,
                                 port=settings.metrics_port, lifespan="off", access_log=False, **common)
    both = _serve_both(uvicorn.Server(main_config), _SideServer(side_config))
    if not hasattr(asyncio, "Runner"):  # Python 3.10
        asyncio.run(both)
        return
    with asyncio.Runner(loop_factory=main_config.get_loop_factory()) as runner:
        runner.run(both)
