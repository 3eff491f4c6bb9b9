"""``/admin``: tenants and their keys. Admin key only."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field

from server.adapters import delete_tenant
from server.deps import AdminDep, GatewayDep
from server.registry import ApiKey
from server.security import TENANT_NAME_RE
from server.gateway import Gateway

router = APIRouter(prefix="/admin", tags=["admin"])
run = anyio.to_thread.run_sync
LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._:@/-]{0,63}$"
KeyId = Path(ge=1, le=2**31 - 1, description="The key's id, as listed by GET /admin/tenants/{name}/keys.")


class TenantCreate(BaseModel):
    name: str = Field(pattern=TENANT_NAME_RE.pattern, description="Tenant name (may appear in metric labels).")
    max_concurrency: int | None = Field(default=None, ge=1, le=1_000_000,
                                        description="Requests in flight; default from settings.")
    tokens_per_minute: int | None = Field(default=None, ge=0, le=10**12,
                                          description="Token budget per minute (0: unlimited); default from settings.")


class KeyCreate(BaseModel):
    label: str | None = Field(default=None, pattern=LABEL_PATTERN,
                              description="What the key is for (e.g. 'ci', 'prod-eu'); shown in key listings.")


class TenantKey(BaseModel):
    name: str
    api_key: str = Field(description="Shown once; only its hash is stored.")
    key_id: int = Field(description="Lists and revokes this key: /admin/tenants/{name}/keys/{key_id}.")


class TenantInfo(BaseModel):
    name: str
    created: int
    adapters: int
    max_concurrency: int | None
    tokens_per_minute: int | None


class TenantList(BaseModel):
    object: str = "list"
    data: list[TenantInfo]


class KeyInfo(BaseModel):
    id: int
    object: str = "api_key"
    created: int
    label: str | None = Field(description="The label given when the key was made, if any.")
    hint: str | None = Field(description="The key's prefix and last 4 characters (null for keys made before "
                                         "hints were kept).")


class KeyList(BaseModel):
    object: str = "list"
    data: list[KeyInfo]


def _issued(gw: Gateway, name: str, record: ApiKey, key: str) -> TenantKey:
    gw.keys.added(record.key_hash)
    return TenantKey(name=name, api_key=key, key_id=record.id)


@router.post("/tenants", status_code=201, response_model=TenantKey)
async def create_tenant(body: TenantCreate, gw: GatewayDep, _admin: AdminDep) -> Any:
    tenant, key = await run(lambda: gw.registry.create_tenant(
        body.name, max_concurrency=body.max_concurrency, tokens_per_minute=body.tokens_per_minute))
    first = (await run(gw.registry.list_keys, tenant.name))[0]
    return _issued(gw, tenant.name, first, key)


@router.get("/tenants", response_model=TenantList)
async def list_tenants(gw: GatewayDep, _admin: AdminDep) -> Any:
    rows = await run(gw.registry.list_tenants)
    return TenantList(data=[TenantInfo(name=t.name, created=t.created, adapters=n, max_concurrency=t.max_concurrency,
                                       tokens_per_minute=t.tokens_per_minute) for t, n in rows])


@router.delete("/tenants/{name}", status_code=204)
async def remove_tenant(name: str, gw: GatewayDep, _admin: AdminDep) -> None:
    tenant = await run(gw.registry.get_tenant, name)
    keys = await run(gw.registry.list_keys, name)
    await delete_tenant(gw, tenant)
    gw.keys.removed({k.key_hash for k in keys})


@router.post("/tenants/{name}/keys", status_code=201, response_model=TenantKey)
async def new_key(name: str, gw: GatewayDep, _admin: AdminDep, body: KeyCreate | None = None) -> Any:
    """A new key for the tenant; its other keys stay valid (rotate: create, deploy, then revoke the old one)."""
    record, key = await run(lambda: gw.registry.add_key(name, label=body.label if body else None))
    return _issued(gw, name, record, key)


@router.get("/tenants/{name}/keys", response_model=KeyList)
async def list_keys(name: str, gw: GatewayDep, _admin: AdminDep) -> Any:
    """The tenant's keys (ids, labels, hints; never the keys themselves), oldest first."""
    keys = await run(gw.registry.list_keys, name)
    return KeyList(data=[KeyInfo(**k.public()) for k in keys])


@router.delete("/tenants/{name}/keys/{key_id}", status_code=204, response_class=Response)
async def revoke_key(name: str, gw: GatewayDep, _admin: AdminDep, key_id: int = KeyId) -> Response:
    """Revoke one key at once on this gateway (other replicas: within ``auth_cache_ttl_s``). The tenant, its
    adapters and its other keys stay."""
    revoked = await run(gw.registry.revoke_key, name, key_id)
    gw.tenants_by_key.invalidate(lambda digest, _tenant: digest == revoked.key_hash)
    gw.keys.removed({revoked.key_hash})
    return Response(status_code=204)
