"""The app factory: ``create_app(settings)`` builds the gateway; uvicorn serves it."""

from __future__ import annotations

import logging
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


def create_app(settings: Settings | None = None) -> FastAPI:
    """A gateway app. Its registry, store and engine client are opened at start-up and closed at shutdown."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = Gateway.build(settings)
        app.state.gateway = gw
        gw.quality = QualityRecorder.for_gateway(gw)
        try:
            await maintain(gw)  # finish deletions a previous process began; sweep leftovers
            await gw.keys.reload()
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
