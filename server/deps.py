"""Shared route dependencies as ``Annotated`` aliases: ``GatewayDep``, ``TenantDep``, ``AdminDep``.

They read the ``Authorization`` header directly (one dependency per route, none nested: this is the hot
path); the bearer scheme is declared in the OpenAPI schema by :func:`server.app.create_app`.
"""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import Depends, Request

from server.errors import Unauthorized
from server.registry import Tenant
from server.security import hash_key, is_well_formed, parse_bearer, same_hash
from server.gateway import Gateway

ADMIN_HINT = "Admin routes need the admin key: 'Authorization: Bearer <FLYLORA_ADMIN_KEY>'."


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def authenticate(gw: Gateway, authorization: str | None) -> Tenant:
    """The tenant of an ``Authorization: Bearer <key>`` header; 401 when the key is missing or unknown.

    Keys are looked up by their SHA-256 (the registry compares the stored hash in constant time); known
    keys are cached by that hash for ``auth_cache_ttl_s``, dropped at once when their tenant is deleted or
    the key revoked. Malformed keys, and unknown keys beyond a small rate, never reach the registry
    (:mod:`server.keyguard`).
    """
    key = parse_bearer(authorization)
    if key is None or not is_well_formed(key):
        raise Unauthorized()
    digest = hash_key(key)
    tenant = gw.tenants_by_key.get(digest)
    if tenant is not None:
        return tenant
    if not gw.keys.admit(digest):
        raise Unauthorized()
    tenant = await gw.tenants_by_key.get_or_load(
        digest, lambda: anyio.to_thread.run_sync(gw.registry.tenant_for_key, key))
    gw.keys.found(digest, tenant is not None)
    if tenant is None:
        raise Unauthorized()
    return tenant


async def require_tenant(request: Request) -> Tenant:
    """The caller's tenant, from its bearer key; 401 when the key is missing or unknown."""
    return await authenticate(request.app.state.gateway, request.headers.get("authorization"))


def require_admin(request: Request) -> None:
    """Only the admin key passes (compared in constant time); tenant keys get 401."""
    admin = request.app.state.gateway.settings.admin_key
    key = parse_bearer(request.headers.get("authorization"))
    if admin is None or key is None or not same_hash(hash_key(key), hash_key(admin.get_secret_value())):
        raise Unauthorized(ADMIN_HINT)


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
TenantDep = Annotated[Tenant, Depends(require_tenant)]
AdminDep = Annotated[None, Depends(require_admin)]
