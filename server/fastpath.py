"""The completion fast path: an ASGI middleware that serves ``POST /v1/chat/completions`` and
``POST /v1/completions`` without FastAPI's router, exception middleware and dependency solver.

Those layers cost about as much CPU as the proxying itself, and these two routes carry nearly all the
traffic. The same functions run either way (``require_tenant``, ``proxy_completion``) and errors go
through the same one mapping (``GatewayError.response``), so the routes registered in
:mod:`server.routes.openai` (which document the API and serve any caller that bypasses this middleware)
behave identically.
"""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .deps import require_tenant
from .errors import GatewayError, error_body
from .proxy import proxy_completion

log = logging.getLogger("flylora.gateway")

ROUTES = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}


class CompletionFastPath:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            tenant = await require_tenant(request)
            response = await proxy_completion(request.app.state.gateway, tenant, request, endpoint)
        except GatewayError as exc:
            response = exc.response()
        except ClientDisconnect:
            return
        except Exception:
            log.exception("unhandled error on %s", scope["path"])
            response = JSONResponse(error_body("Internal server error.", "server_error"), status_code=500)
        await response(scope, receive, send)
