"""``/v1/adapters``: upload, list, read, delete the caller's adapters."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from server.adapters import delete_adapter, resolve_adapter, upload_adapter
from server.deps import GatewayDep, TenantDep
from server.errors import AdapterNotFound
from server.integrity import Verdict
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
    status: str = Field(description="`ready`, or `unavailable` when its stored files are missing or damaged "
                                    "(its requests get 503 adapter_unavailable until they are restored).")
    status_details: str | None = Field(default=None, description="Why it is unavailable.")

    @classmethod
    def of(cls, adapter: Adapter, verdict: Verdict | None = None) -> AdapterInfo:
        broken = verdict is not None and not verdict.ok
        return cls(id=adapter.name, base_model=adapter.base_model, r=adapter.r, top_k=adapter.top_k,
                   routing=adapter.routing, bytes=adapter.bytes, sha256=adapter.sha256, created=adapter.created,
                   status="unavailable" if broken else adapter.state,
                   status_details=verdict.detail if broken else None)


class AdapterList(BaseModel):
    """One page of the caller's adapters, by name (OpenAI's list shape: ``has_more``, ``first_id``, ``last_id``)."""

    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    has_more: bool = Field(default=False, description="More adapters follow: ask again with `after=<last_id>`.")
    first_id: str | None = None
    last_id: str | None = None


#: Adapters per page of ``GET /v1/adapters``: by default, and at most.
PAGE_DEFAULT, PAGE_MAX = 1000, 1000


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
async def list_adapters(
    tenant: TenantDep, gw: GatewayDep,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="Adapters per page.")] = PAGE_DEFAULT,
    after: Annotated[str | None, Query(max_length=64, description="The `last_id` of the page before.")] = None,
) -> Any:
    adapters = await anyio.to_thread.run_sync(partial(gw.registry.list_adapters, tenant.id, after=after,
                                                      limit=limit + 1))
    has_more = len(adapters) > limit
    adapters = adapters[:limit]
    cached = gw.integrity.cached if gw.integrity is not None else (lambda _id: None)
    return AdapterList(data=[AdapterInfo.of(a, cached(a.internal_id)) for a in adapters], has_more=has_more,
                       first_id=adapters[0].name if adapters else None,
                       last_id=adapters[-1].name if adapters else None)


@router.get("/{name}", response_model=AdapterInfo)
async def get_adapter(name: str, tenant: TenantDep, gw: GatewayDep) -> Any:
    adapter = await resolve_adapter(gw, tenant, name)
    if adapter is None:
        raise AdapterNotFound(name)
    verdict = None
    if gw.integrity is not None:  # a fresh look at its files
        verdict = await gw.integrity.check(adapter, force=True)
        if not verdict.ok:
            gw.integrity.confirm(adapter, verdict)
    return AdapterInfo.of(adapter, verdict)


@router.delete("/{name}", status_code=204, response_class=Response)
async def remove_adapter(name: str, tenant: TenantDep, gw: GatewayDep) -> Response:
    await delete_adapter(gw, tenant, name)
    return Response(status_code=204)
