"""``/v1/adapters``: upload, list, read, delete the caller's adapters."""

from __future__ import annotations

from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from server.adapters import delete_adapter, resolve_adapter, upload_adapter
from server.deps import GatewayDep, TenantDep
from server.errors import AdapterNotFound
from server.registry import Adapter

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


class AdapterInfo(BaseModel):
    """An adapter as its tenant sees it (never the internal id)."""

    id: str = Field(description="The adapter's name: the `model` of completion requests.")
    object: Literal["adapter"] = "adapter"
    base_model: str
    r: int
    top_k: int
    routing: str
    bytes: int = Field(description="Size of the weights file.")
    sha256: str = Field(description="SHA-256 of the weights file.")
    created: int
    status: str

    @classmethod
    def of(cls, adapter: Adapter) -> AdapterInfo:
        return cls(id=adapter.name, base_model=adapter.base_model, r=adapter.r, top_k=adapter.top_k,
                   routing=adapter.routing, bytes=adapter.bytes, sha256=adapter.sha256, created=adapter.created,
                   status=adapter.state)


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


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
}


@router.post("", status_code=201, openapi_extra=UPLOAD_BODY, response_model=AdapterInfo)
async def upload(request: Request, tenant: TenantDep, gw: GatewayDep) -> Any:
    return AdapterInfo.of(await upload_adapter(gw, tenant, request))


@router.get("", response_model=AdapterList)
async def list_adapters(tenant: TenantDep, gw: GatewayDep) -> Any:
    adapters = await anyio.to_thread.run_sync(gw.registry.list_adapters, tenant.id)
    return AdapterList(data=[AdapterInfo.of(a) for a in adapters])


@router.get("/{name}", response_model=AdapterInfo)
async def get_adapter(name: str, tenant: TenantDep, gw: GatewayDep) -> Any:
    adapter = await resolve_adapter(gw, tenant, name)
    if adapter is None:
        raise AdapterNotFound(name)
    return AdapterInfo.of(adapter)


@router.delete("/{name}", status_code=204, response_class=Response)
async def remove_adapter(name: str, tenant: TenantDep, gw: GatewayDep) -> Response:
    await delete_adapter(gw, tenant, name)
    return Response(status_code=204)
