"""Adapter life cycle: upload (receive -> validate -> store -> register) and deletion (evict -> files -> row).

Upload order and what undoes each step on failure, so a failure anywhere leaves nothing behind:

1. stream the form into a staging folder inside the store      (undo: remove the staging folder)
2. check the name, then validate with ``flylora_runtime`` off the event loop
3. rename the staging folder to ``<store>/<internal id>``        (undo: remove that folder)
4. insert the registry row (409 on a duplicate name)             (nothing after it can fail)

Deletion takes the adapter out of service first (state ``deleting``: it resolves as missing), evicts it
from every engine, removes its folder, then its row. It runs shielded from cancellation so it always
finishes; an engine that fails to evict is logged and counted, and the registry is never left half-deleted.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import anyio
from starlette.requests import Request

from flylora_runtime.format.checkpoint import validate_files
from flylora_runtime.format.errors import AdapterError

from server.errors import AdapterExists, AdapterNotFound, InvalidRequest
from server.registry import READY, Adapter, Tenant
from server.security import ADAPTER_NAME_RE, new_internal_id
from server.gateway import Gateway
from server.uploads import receive_adapter_upload

log = logging.getLogger("flylora.gateway.adapters")

run = anyio.to_thread.run_sync


def check_adapter_name(name: str) -> None:
    if not ADAPTER_NAME_RE.fullmatch(name):
        raise InvalidRequest(
            "Adapter names are 1 to 64 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit; "
            f"found {name[:80]!r}.", param="name")


async def upload_adapter(gw: Gateway, tenant: Tenant, request: Request) -> Adapter:
    """Receive, validate, store and register an uploaded adapter; see the module docstring."""
    store, registry = gw.store, gw.registry
    staging = await run(store.new_staging)
    committed: str | None = None
    registered = False
    try:
        config_path, weights_path = store.staged_files(staging)
        upload = await receive_adapter_upload(request, staging, config_path, weights_path,
                                              max_weights_bytes=gw.settings.max_upload_bytes,
                                              check_name=check_adapter_name)
        check_adapter_name(upload.name)
        if upload.name == gw.settings.base_model_id:
            raise InvalidRequest(f"`{upload.name}` is the base model's name; choose another.", param="name")
        if await run(registry.has_adapter_name, tenant.id, upload.name):
            raise AdapterExists(upload.name)
        spec = await run(gw.base_spec)
        manifest = await run(partial(validate_files, config_path, weights_path, spec,
                                     max_bytes=gw.settings.max_upload_bytes, config_name=upload.config_filename,
                                     weights_name=upload.weights_filename))
        internal_id = new_internal_id()
        await run(store.commit, staging, internal_id)
        committed = internal_id
        adapter = Adapter(
            tenant_id=tenant.id, name=upload.name, internal_id=internal_id, base_model=gw.settings.base_model_id,
            r=manifest.config.r, top_k=manifest.config.top_k, routing=manifest.config.routing,
            bytes=manifest.weights_bytes, sha256=manifest.sha256, created=int(time.time()), state=READY)
        await run(registry.add_adapter, adapter)
        registered = True
    except AdapterError as exc:
        gw.metrics.validation_failures.labels(tenant.name, type(exc).__name__).inc()
        raise
    finally:
        if not registered:
            with anyio.CancelScope(shield=True):
                await run(store.discard, staging)
                if committed is not None:
                    await run(store.remove, committed)
    gw.metrics.uploads.labels(tenant.name).inc()
    log.info("tenant %s registered adapter %s as %s (%d bytes)", tenant.name, adapter.name, adapter.internal_id,
             adapter.bytes)
    return adapter


async def resolve_adapter(gw: Gateway, tenant: Tenant, name: str) -> Adapter | None:
    """The tenant's ready adapter of that name (cached; dropped at once when it is deleted), or None."""
    load = partial(run, gw.registry.get_adapter, tenant.id, name)
    return await gw.adapters_by_name.get_or_load((tenant.id, name), load)


async def _purge(gw: Gateway, adapter: Adapter) -> None:
    """Evict from engines, remove files, remove the row: always all three."""
    gw.adapters_by_name.invalidate(lambda _k, v: v.internal_id == adapter.internal_id)
    failed = await gw.upstream.unload(adapter.internal_id)
    if failed:
        log.error("adapter %s (%s) may still be cached by %s; its files and row are removed anyway",
                  adapter.internal_id, adapter.name, failed)
    await run(gw.store.remove, adapter.internal_id)
    await run(gw.registry.delete_adapter_row, adapter.internal_id)


async def delete_adapter(gw: Gateway, tenant: Tenant, name: str) -> None:
    """Delete the tenant's adapter; :class:`AdapterNotFound` if it has none of that name."""
    with anyio.CancelScope(shield=True):
        adapter = await run(gw.registry.mark_deleting, tenant.id, name)
        if adapter is None:
            raise AdapterNotFound(name)
        await _purge(gw, adapter)
    gw.metrics.deletes.labels(tenant.name).inc()


async def delete_tenant(gw: Gateway, tenant: Tenant) -> None:
    """Delete a tenant with all its adapters and keys."""
    with anyio.CancelScope(shield=True):
        for adapter in await run(partial(gw.registry.list_adapters, tenant.id, state=None)):
            await _purge(gw, adapter)
        await run(gw.registry.delete_tenant, tenant.id)
    gw.tenants_by_key.invalidate(lambda _k, v: v.id == tenant.id)
    gw.limiter.forget(tenant.id)


async def finish_interrupted_deletions(gw: Gateway) -> int:
    """At start-up: complete deletions a previous process began (rows left in state ``deleting``)."""
    pending = [a for a in await run(partial(gw.registry.list_adapters, None, state=None)) if a.state != READY]
    for adapter in pending:
        await _purge(gw, adapter)
    return len(pending)
