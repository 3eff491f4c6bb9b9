"""``POST /flylora/energy`` on the engine's API server: per-request token statistics from the worker.

The worker keeps them (:mod:`.energy`); this route asks it through ``engine_client.collective_rpc``, which
vLLM runs between two scheduler steps. One call serves many requests: the gateway batches its questions.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from flylora_runtime.vllm_plugin.energy import CONTROL_METHOD, CONTROL_ROUTE, MAX_QUERY, ROUTE, RPC_METHOD

router = APIRouter()
RPC_TIMEOUT_S = 30.0


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": None}}, status_code=status)


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
    engine = request.app.state.engine_client
    replies = await engine.collective_rpc(RPC_METHOD, timeout=RPC_TIMEOUT_S, args=(queries, detail))
    return JSONResponse(replies[0] if isinstance(replies, list) else replies)


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
    replies = await request.app.state.engine_client.collective_rpc(CONTROL_METHOD, timeout=RPC_TIMEOUT_S,
                                                                   args=tuple(args))
    return JSONResponse(replies[0] if isinstance(replies, list) else replies)
