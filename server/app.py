"""The app factory: ``create_app(settings)`` builds the gateway; uvicorn serves it."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from server.adapters import add_missing_engine_forms, maintain, maintain_forever
from server.errors import install_error_handlers
from server.fastpath import GatewayApp
from server.quality_recorder import QualityRecorder
from server.request_policy import RequestPolicy
from server.routes import adapters, admin, health, openai, quality
from server.settings import Settings
from server.gateway import Gateway

log = logging.getLogger("flylora.gateway")


def create_app(settings: Settings | None = None, *, freeze_heap: bool = False) -> FastAPI:
    """A gateway app. Its registry, store and engine client are opened at start-up and closed at shutdown.

    ``freeze_heap`` (what ``flylora-gateway`` serves with): once started, the process's Python heap is frozen
    (:func:`freeze_startup_heap`), as vLLM's API server freezes its own; thawed again at shutdown. Off by
    default: a process that builds many apps (the tests) would pay a full collection for each."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = Gateway.build(settings)
        app.state.gateway = gw
        gw.quality = QualityRecorder.for_gateway(gw)
        try:
            await maintain(gw)  # finish deletions a previous process began; sweep leftovers
            await gw.keys.reload()
            if freeze_heap:
                freeze_startup_heap()
            async with anyio.create_task_group() as tg:
                if settings.health_check_interval_s > 0:
                    tg.start_soon(gw.upstream.watch_health)
                tg.start_soon(gw.keys.watch)
                tg.start_soon(maintain_forever, gw)
                tg.start_soon(add_missing_engine_forms, gw)
                if gw.quality is not None:
                    tg.start_soon(gw.quality.run)
                yield
                tg.cancel_scope.cancel()
            if gw.quality is not None:
                await gw.quality.aclose()
        finally:
            if freeze_heap:
                gc.unfreeze()
            await gw.aclose()

    app = GatewayApp(
        title="FlyLoRA gateway",
        summary="OpenAI-compatible, multi-tenant serving of FlyLoRA adapters on vLLM.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.completion_fast_path = settings.completion_fast_path
    for module in (openai, adapters, quality, admin, health):
        app.include_router(module.router)
    _document(app, RequestPolicy(settings))
    return app


def freeze_startup_heap() -> int:
    """One full garbage collection, then ``gc.freeze()``: the objects of start-up (modules, the app, its routes and
    schemas; ~126,000 in ``flylora-gateway`` here) are never scanned by a collection again, so a full collection,
    which Python starts by itself and which stops every stream the gateway proxies while it runs, scans only what
    came after (vLLM's API server does the same, ``freeze_gc_heap``). Returns the number of objects frozen."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("gateway heap frozen after start-up: %d objects exempt from garbage collection (%.2f s)", frozen,
             time.perf_counter() - t0)
    return frozen


PUBLIC_PATHS = ("/health", "/ready", "/metrics")


def _document(app: FastAPI, policy: RequestPolicy) -> None:
    """Complete the OpenAPI schema: the bearer scheme (the checks live in ``deps``) and the completion bodies
    the request policy accepts, with this app's caps."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            openai.document_completion_bodies(schema, policy)
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer",
                "description": "A tenant key, or on /admin routes the admin key (FLYLORA_ADMIN_KEY)."}
            for path, ops in schema.get("paths", {}).items():
                if path not in PUBLIC_PATHS:
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
