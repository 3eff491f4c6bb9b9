"""``POST /flylora/energy`` on the engine's API server: per-request token statistics from the worker.

The worker keeps them (:mod:`.energy`); this route asks it through ``engine_client.collective_rpc``, which
vLLM runs between two scheduler steps. One call serves many requests: the gateway batches its questions.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from vllm.v1.engine.exceptions import EngineDeadError

from flylora_runtime.vllm_plugin.energy import CONTROL_METHOD, CONTROL_ROUTE, MAX_QUERY, ROUTE, RPC_METHOD

router = APIRouter()
#: How long a route waits for the worker's answer. vLLM's client waits for a utility reply with no limit of
#: its own, and a call that reaches an engine core while it shuts down is never answered: unbounded, that
#: request would keep the API server from exiting on SIGTERM (uvicorn waits for every request to end).
RPC_TIMEOUT_S = 10.0


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": None}}, status_code=status)


async def call_worker(engine_client: Any, method: str, args: tuple) -> Any | JSONResponse:
    """The worker's reply to ``method``, or a 503 answer when none comes within ``RPC_TIMEOUT_S`` (or the
    engine core is gone)."""
    try:
        replies = await asyncio.wait_for(engine_client.collective_rpc(method, timeout=RPC_TIMEOUT_S, args=args),
                                         RPC_TIMEOUT_S)
    except (asyncio.TimeoutError, EngineDeadError) as exc:
        return _error(f"The engine did not answer ({type(exc).__name__}); it may be shutting down.", 503)
    return replies[0] if isinstance(replies, list) else replies


def parse_queries(body: object) -> tuple[list[tuple[str, int | None]], bool] | str:
    """``{"requests": [{"id": str, "tokens": int?}], "detail": bool?}`` -> (queries, detail), or an error."""
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        return "The body must be an object with a `requests` list."
    requests = body["requests"]
    if len(requests) > MAX_QUERY:
        return f"At most {MAX_QUERY} requests per call; found {len(requests)}."
    queries: list[tuple[str, int | None]] = []
    for item in requests:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not 0 < len(item["id"]) <= 256:
            return "Each request must be an object with an `id` string of 1 to 256 characters."
        tokens = item.get("tokens")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            return "`tokens` must be a non-negative integer when given."
        queries.append((item["id"], tokens))
    detail = body.get("detail", False)
    if not isinstance(detail, bool):
        return "`detail` must be a boolean."
    return queries, detail


@router.post(ROUTE, include_in_schema=False)
async def take_energy(request: Request) -> JSONResponse:
    try:
        body = await request.json()
    except ValueError:
        return _error("The body is not valid JSON.")
    parsed = parse_queries(body)
    if isinstance(parsed, str):
        return _error(parsed)
    queries, detail = parsed
    if not queries:
        return JSONResponse({"results": {}, "missing": []})
    reply = await call_worker(request.app.state.engine_client, RPC_METHOD, (queries, detail))
    return reply if isinstance(reply, JSONResponse) else JSONResponse(reply)


@router.post(CONTROL_ROUTE, include_in_schema=False)
async def control(request: Request) -> JSONResponse:
    """``{"enabled": bool, "entropy": bool}`` (both optional) pause or resume measuring and the entropy; any
    body (or none) returns the counters."""
    raw = await request.body()
    args: list[bool | None] = [None, None]
    if raw.strip():
        try:
            body = await request.json()
        except ValueError:
            return _error("The body is not valid JSON.")
        if not isinstance(body, dict) or any(not isinstance(body.get(k, False), bool) for k in ("enabled", "entropy")):
            return _error("The body must be an object with optional booleans `enabled` and `entropy`.")
        args = [body.get("enabled"), body.get("entropy")]
    reply = await call_worker(request.app.state.engine_client, CONTROL_METHOD, tuple(args))
    return reply if isinstance(reply, JSONResponse) else JSONResponse(reply)
