"""``/health``, ``/ready``, ``/metrics``: no key. ``/metrics`` moves to its own port when ``metrics_port`` is set
(:mod:`server.serve`); deployments keep that port off the public network."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import GatewayDep

router = APIRouter(tags=["ops"])


@router.get("/health", response_model=None)
async def health() -> dict[str, Any]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(gw: GatewayDep) -> JSONResponse:
    """200 when at least one engine's /health answers 200, else 503."""
    engines = await gw.upstream.health()
    ok = any(engines.values())
    return JSONResponse({"status": "ready" if ok else "unavailable", "engines": engines},
                        status_code=200 if ok else 503)


@router.get("/metrics", response_model=None)
async def metrics(gw: GatewayDep) -> Response:
    """Prometheus metrics; 404 here when they are served on the separate metrics port."""
    if gw.settings.metrics_port is not None:
        raise HTTPException(status_code=404, detail="Not Found")
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
