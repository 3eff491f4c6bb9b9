"""The engine's API key: every route but ``/health`` and ``/metrics`` needs ``Authorization: Bearer <key>``.

The key comes from ``FLYLORA_ENGINE_API_KEY``, the same variable the gateway reads to send it. ``flylora-engine``
installs :class:`EngineKeyMiddleware` into vLLM's server (``--middleware``) whenever the key is set, and
refuses to listen on a non-loopback address without one.

Why not vLLM's own ``--api-key``: it guards only the ``/v1``, ``/v2``, ``/inference`` and ``/cohere`` prefixes
(vLLM documents this), and the server also carries routes outside them that run inference or load adapters
from any path on the engine's disk (SageMaker's ``/invocations`` and ``POST /adapters``, among others). This
middleware denies by default: a route vLLM adds in a later version is guarded too.

Standard library only: vLLM imports it in its API server; the gateway imports :func:`secret_problem`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

API_KEY_ENV = "FLYLORA_ENGINE_API_KEY"
MIDDLEWARE = "flylora_runtime.engine.auth.EngineKeyMiddleware"
#: Reachable without the key (read-only: health probes and Prometheus).
OPEN_PATHS = frozenset({"/health", "/metrics", "/metrics/"})
#: Shared secrets (admin key, engine key) shorter than this are refused (``openssl rand -hex 24``: 48).
MIN_SECRET_CHARS = 32
#: Placeholders of example files: a secret containing one is refused.
PLACEHOLDERS = ("change-me", "changeme", "replace-me", "replaceme", "your-admin-key", "example")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def secret_problem(value: str) -> str | None:
    """Why ``value`` may not be a shared secret (a placeholder, too short, too uniform), or None."""
    lowered = value.lower()
    hint = "generate one: openssl rand -hex 24"
    for word in PLACEHOLDERS:
        if word in lowered:
            return f"it contains the placeholder {word!r} of an example file; {hint}"
    if len(value) < MIN_SECRET_CHARS:
        return f"it has {len(value)} characters, fewer than the {MIN_SECRET_CHARS} required; {hint}"
    if len(set(value)) < 8:
        return f"it uses fewer than 8 distinct characters; {hint}"
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        return "it contains whitespace or control characters, which an HTTP header cannot carry reliably"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value if isinstance(value, bytes) else value.encode("utf-8")).digest()


class EngineKeyMiddleware:
    """Pure ASGI: 401 for any HTTP request without the engine key, except GET/HEAD on :data:`OPEN_PATHS`."""

    def __init__(self, app: ASGIApp, key: str | None = None):
        key = key if key is not None else os.environ.get(API_KEY_ENV)
        if not key:
            raise RuntimeError(f"{MIDDLEWARE} needs {API_KEY_ENV} (the engine key shared with the gateway)")
        self.app = app
        self.expected = _digest(key)

    def allowed(self, scope: Scope) -> bool:
        if scope.get("method") in ("GET", "HEAD") and scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(_digest(token.strip()), self.expected)
        return False

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] not in ("http", "websocket") or self.allowed(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            body = json.dumps({"error": {"message": "This engine needs its API key: 'Authorization: Bearer "
                                                   f"<{API_KEY_ENV}>'.", "type": "invalid_request_error",
                                         "param": None, "code": "invalid_api_key"}}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
