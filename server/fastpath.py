"""The completion fast path: plain ASGI serving the completion routes (:data:`server.proxy.COMPLETION_ROUTES`)
before FastAPI's middleware stack, router and dependency solver.

Those layers cost about as much CPU as the proxying itself, and these two routes carry nearly all the
traffic. Here the two headers that matter are read straight from the ASGI scope and the rest is
:func:`server.proxy.serve_completion`, the same function the FastAPI routes in :mod:`server.routes.openai`
call (they document the API and serve any caller when the fast path is off), so both behave identically.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from server.gateway import Gateway
from server.proxy import COMPLETION_ROUTES, serve_completion


class CompletionFastPath:
    """ASGI wrapper of the app's middleware stack (see :class:`GatewayApp`)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = COMPLETION_ROUTES.get(scope["path"]) if scope["type"] == "http" else None
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
            response = await serve_completion(
                gw, endpoint, None if authorization is None else authorization.decode("latin-1"),
                None if declared is None else declared.decode("latin-1"), receive)
        except ClientDisconnect:
            return
        await response(scope, receive, send)


class GatewayApp(FastAPI):
    """The FastAPI app, with :class:`CompletionFastPath` outside its middleware stack when enabled."""

    completion_fast_path: bool = False

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return CompletionFastPath(stack) if self.completion_fast_path else stack
