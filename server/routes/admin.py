"""``/admin``: tenants and their keys. Admin key only."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter
from pydantic import BaseModel, Field

from server.adapters import delete_tenant
from server.deps import AdminDep, GatewayDep
from server.security import TENANT_NAME_RE

router = APIRouter(prefix="/admin", tags=["admin"])
run = anyio.to_thread.run_sync


class TenantCreate(BaseModel):
    name: str = Field(pattern=TENANT_NAME_RE.pattern, description="Tenant name (may appear in metric labels).")
    max_concurrency: int | None = Field(default=None, ge=1, le=1_000_000,
                                        description="Requests in flight; default from settings.")
    tokens_per_minute: int | None = Field(default=None, ge=0, le=10**12,
                                          description="Token budget per minute (0: unlimited); default from settings.")


class TenantKey(BaseModel):
    name: str
    api_key: str = Field(description="Shown once; only its hash is stored.")


class TenantInfo(BaseModel):
    name: str
    created: int
    adapters: int
    max_concurrency: int | None
    tokens_per_minute: int | None


class TenantList(BaseModel):
    object: str = "list"
    data: list[TenantInfo]


@router.post("/tenants", status_code=201, response_model=TenantKey)
async def create_tenant(body: TenantCreate, gw: GatewayDep, _admin: AdminDep) -> Any:
    tenant, key = await run(lambda: gw.registry.create_tenant(
        body.name, max_concurrency=body.max_concurrency, tokens_per_minute=body.tokens_per_minute))
    return TenantKey(name=tenant.name, api_key=key)


@router.get("/tenants", response_model=TenantList)
async def list_tenants(gw: GatewayDep, _admin: AdminDep) -> Any:
    rows = await run(gw.registry.list_tenants)
    return TenantList(data=[TenantInfo(name=t.name, created=t.created, adapters=n, max_concurrency=t.max_concurrency,
                                       tokens_per_minute=t.tokens_per_minute) for t, n in rows])


@router.delete("/tenants/{name}", status_code=204)
async def remove_tenant(name: str, gw: GatewayDep, _admin: AdminDep) -> None:
    tenant = await run(gw.registry.get_tenant, name)
    await delete_tenant(gw, tenant)


@router.post("/tenants/{name}/keys", status_code=201, response_model=TenantKey)
async def new_key(name: str, gw: GatewayDep, _admin: AdminDep) -> Any:
    key = await run(gw.registry.add_key, name)
    return TenantKey(name=name, api_key=key)
