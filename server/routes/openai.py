"""The OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request, Response

from server.deps import GatewayDep, TenantDep
from server.proxy import proxy_completion

router = APIRouter(prefix="/v1", tags=["openai"])


def _body(required: list[str], props: dict[str, Any]) -> dict[str, Any]:
    common = {
        "model": {"type": "string", "minLength": 1}, "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer", "minimum": 0}, "n": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0},
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["model", *required], "properties": {**common, **props},
        "additionalProperties": True}}}}}


CHAT_BODY = _body(["messages"], {"messages": {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}}})
COMPLETION_BODY = _body(["prompt"], {"prompt": {"type": "string", "minLength": 1}})


@router.post("/chat/completions", openapi_extra=CHAT_BODY, response_model=None)
async def chat_completions(request: Request, tenant: TenantDep, gw: GatewayDep) -> Response:
    return await proxy_completion(gw, tenant, request, "chat.completions")


@router.post("/completions", openapi_extra=COMPLETION_BODY, response_model=None)
async def completions(request: Request, tenant: TenantDep, gw: GatewayDep) -> Response:
    return await proxy_completion(gw, tenant, request, "completions")


@router.get("/models", response_model=None)
async def models(tenant: TenantDep, gw: GatewayDep) -> dict[str, Any]:
    base = gw.settings.base_model_id
    adapters = await anyio.to_thread.run_sync(gw.registry.list_adapters, tenant.id)
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "flylora", "root": base, "parent": None}]
    data += [{"id": a.name, "object": "model", "created": a.created, "owned_by": tenant.name, "root": base,
              "parent": base} for a in adapters]
    return {"object": "list", "data": data}
