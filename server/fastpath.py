"""The completion fast path: plain ASGI serving ``POST /v1/chat/completions`` and ``POST /v1/completions``
before FastAPI's middleware stack, router and dependency solver.

Those layers cost about as much CPU as the proxying itself, and these two routes carry nearly all the
traffic. Here the two headers that matter are read straight from the ASGI scope and the body from
``receive``; then the same functions run as on the FastAPI routes (``authenticate``, ``forward_completion``)
and errors go through the same one mapping (``GatewayError.response``), so the routes registered in
:mod:`server.routes.openai` (which document the API and serve any caller when the fast path is off)
behave identically.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from server.deps import authenticate
from server.errors import GatewayError, PayloadTooLarge, error_body
from server.proxy import forward_completion
from server.state import Gateway

log = logging.getLogger("flylora.gateway")

ROUTES = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}


async def receive_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The whole request body from ASGI messages, or :class:`PayloadTooLarge` as soon as it passes ``limit``
    bytes (or declares more in Content-Length); :class:`ClientDisconnect` if the client goes away."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared.decode()} bytes; the limit is {limit}.")
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


class CompletionFastPath:
    """ASGI wrapper of the app's middleware stack (see :class:`GatewayApp`)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        gw: Gateway = scope["app"].state.gateway
        authorization: bytes | None = None
        declared: bytes | None = None
        for name, value in scope["headers"]:  # names are lower case (ASGI); the first of each counts
            if name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"content-length" and declared is None:
                declared = value
        try:
            tenant = await authenticate(gw, None if authorization is None else authorization.decode("latin-1"))
            started = time.perf_counter()
            try:
                body = await receive_body(receive, declared, gw.settings.max_request_bytes)
            except GatewayError as exc:
                gw.metrics.requests_by[(tenant.name, endpoint, exc.status)].inc()
                raise
            response = await forward_completion(gw, tenant, body, endpoint, started)
        except GatewayError as exc:
            response = exc.response()
        except ClientDisconnect:
            return
        except Exception:
            log.exception("unhandled error on %s", scope["path"])
            response = JSONResponse(error_body("Internal server error.", "server_error"), status_code=500)
        await response(scope, receive, send)


class GatewayApp(FastAPI):
    """The FastAPI app, with :class:`CompletionFastPath` outside its middleware stack when enabled."""

    completion_fast_path: bool = False

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return CompletionFastPath(stack) if self.completion_fast_path else stack
