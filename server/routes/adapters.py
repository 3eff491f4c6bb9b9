"""``/v1/adapters``: upload, list, read, delete the caller's adapters."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request, Response

from server.adapters import delete_adapter, resolve_adapter, upload_adapter
from server.deps import GatewayDep, TenantDep
from server.errors import AdapterNotFound

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

ADAPTER_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": ["adapter"]},
        "base_model": {"type": "string"}, "r": {"type": "integer"}, "top_k": {"type": "integer"},
        "routing": {"type": "string"}, "bytes": {"type": "integer"}, "sha256": {"type": "string"},
        "created": {"type": "integer"}, "status": {"type": "string"},
    },
}

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["name", "config", "weights"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"},
                "config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
                "weights": {"type": "string", "format": "binary", "description": "adapter_model.safetensors"},
            },
        }}},
    },
    "responses": {"201": {"description": "The adapter", "content": {"application/json": {"schema": ADAPTER_SCHEMA}}}},
}


@router.post("", status_code=201, openapi_extra=UPLOAD_BODY, response_model=None)
async def upload(request: Request, tenant: TenantDep, gw: GatewayDep) -> dict[str, Any]:
    adapter = await upload_adapter(gw, tenant, request)
    return adapter.public()


@router.get("", response_model=None)
async def list_adapters(tenant: TenantDep, gw: GatewayDep) -> dict[str, Any]:
    adapters = await anyio.to_thread.run_sync(gw.registry.list_adapters, tenant.id)
    return {"object": "list", "data": [a.public() for a in adapters]}


@router.get("/{name}", response_model=None)
async def get_adapter(name: str, tenant: TenantDep, gw: GatewayDep) -> dict[str, Any]:
    adapter = await resolve_adapter(gw, tenant, name)
    if adapter is None:
        raise AdapterNotFound(name)
    return adapter.public()


@router.delete("/{name}", status_code=204, response_class=Response)
async def remove_adapter(name: str, tenant: TenantDep, gw: GatewayDep) -> Response:
    await delete_adapter(gw, tenant, name)
    return Response(status_code=204)
