"""Shared route dependencies as ``Annotated`` aliases: ``GatewayDep``, ``TenantDep``, ``AdminDep``."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import Unauthorized
from .registry import Tenant
from .security import hash_key, same_hash
from .state import Gateway

#: Declares bearer auth in the OpenAPI schema; the checks below do the refusing (401 in OpenAI's shape).
bearer = HTTPBearer(auto_error=False, description="A tenant key (or, on /admin routes, the admin key).")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def require_tenant(gw: GatewayDep, credentials: BearerDep) -> Tenant:
    """The caller's tenant, from its bearer key; 401 when the key is missing or unknown."""
    if credentials is None or not credentials.credentials:
        raise Unauthorized()
    digest = hash_key(credentials.credentials)
    tenant = gw.tenants_by_key.get(digest)
    if tenant is None:
        tenant = await anyio.to_thread.run_sync(gw.registry.tenant_for_key, credentials.credentials)
        if tenant is None:
            raise Unauthorized()
        gw.tenants_by_key.put(digest, tenant)
    return tenant


def require_admin(gw: GatewayDep, credentials: BearerDep) -> None:
    """Only the admin key passes (compared in constant time); tenant keys get 401."""
    admin = gw.settings.admin_key
    if admin is None or credentials is None:
        raise Unauthorized("Admin routes need the admin key: 'Authorization: Bearer <FLYLORA_ADMIN_KEY>'.")
    given = hash_key(credentials.credentials)
    if not same_hash(given, hash_key(admin.get_secret_value())):
        raise Unauthorized("Admin routes need the admin key: 'Authorization: Bearer <FLYLORA_ADMIN_KEY>'.")


TenantDep = Annotated[Tenant, Depends(require_tenant)]
AdminDep = Annotated[None, Depends(require_admin)]
