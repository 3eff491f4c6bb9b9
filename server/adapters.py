"""Adapter life cycle: upload (admit -> receive -> validate -> store -> register) and deletion
(out of service -> drain -> tombstone -> evict -> files -> row).

Upload order and what undoes each step on failure, so a failure anywhere leaves nothing behind:

0. upload admission (:mod:`server.admission`): concurrency, quota and free space, before the body is read
1. stream the form into a staging folder inside the store      (undo: remove the staging folder)
2. check the name, then validate with ``flylora_runtime`` in the upload threads (bounded memory, the
   engine's max rank), and replace the config by its canonical form (what the engine reads is what was
   checked); write the weights' engine form beside them (``engine_form``; a bf16 engine loads it without
   converting: :mod:`flylora_runtime.format.engine_form`; not written, the adapter is still stored)
3. final quota check and rename the staging folder to ``<store>/<internal id>``  (undo: remove that folder)
4. insert the registry row (409 on a duplicate name)             (nothing after it can fail)
5. vouch for its files in the integrity checker (its first request does not hash them again)

Adapters stored before engine forms were written get theirs at the next start
(:func:`add_missing_engine_forms`, after their weights are checked against the registry's SHA-256).

Deletion takes the adapter out of service first (state ``deleting``: it resolves as missing), lets its
running requests finish for ``delete_grace_s`` and cuts the rest (:mod:`server.inflight`), writes its
tombstone (the engines' resolvers refuse it), evicts it from every engine (which fails the requests still
queued for it), then removes its folder and its row. If an engine cannot confirm the eviction, the folder
stays (an engine may still need it: reloading a missing adapter inside an engine step kills the engine)
and the row stays ``deleting``; :func:`maintain` retries. A tenant deletion first records itself, revokes
the keys and marks every adapter ``deleting`` in one transaction, so a crash leaves nothing ready whose
files are gone; start-up and :func:`maintain` finish it. Deletions run shielded from cancellation.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial

import anyio
from starlette.requests import Request

from flylora_runtime.format.checkpoint import validate_files
from flylora_runtime.format.engine_form import ENGINE_FORM_NAME
from flylora_runtime.format.errors import AdapterError

from server.admission import UploadTicket
from server.errors import AdapterExists, AdapterNotFound, InvalidRequest, PayloadTooLarge
from server.registry import READY, Adapter, Tenant
from server.security import ADAPTER_NAME_RE, new_internal_id
from server.gateway import Gateway
from server.integrity import verify
from server.uploads import declared_length, receive_adapter_upload, upload_ceiling

log = logging.getLogger("flylora.gateway.adapters")

run = anyio.to_thread.run_sync


def check_adapter_name(name: str) -> None:
    if not ADAPTER_NAME_RE.fullmatch(name):
        raise InvalidRequest(
            "Adapter names are 1 to 64 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit; "
            f"found {name[:80]!r}.", param="name")


async def upload_adapter(gw: Gateway, tenant: Tenant, request: Request) -> Adapter:
    """Admit, receive, validate, store and register an uploaded adapter; see the module docstring."""
    ceiling = upload_ceiling(gw.settings.max_upload_bytes)
    declared = declared_length(request)
    if declared is not None and declared > ceiling:
        raise PayloadTooLarge(f"The upload is {declared} bytes; the weights limit is {gw.settings.max_upload_bytes} "
                              "bytes.", param="weights")
    async with gw.uploads.admit(tenant, min(declared or ceiling, ceiling)) as ticket:
        return await _upload(gw, tenant, request, ticket)


async def _upload(gw: Gateway, tenant: Tenant, request: Request, ticket: UploadTicket) -> Adapter:
    store, registry, uploads = gw.store, gw.registry, gw.uploads
    staging = await uploads.run(store.new_staging)
    uploads.hold_staging(ticket, staging.name)
    committed: str | None = None
    registered = False
    try:
        config_path, weights_path = store.staged_files(staging)
        upload = await receive_adapter_upload(request, staging, config_path, weights_path,
                                              max_weights_bytes=gw.settings.max_upload_bytes,
                                              check_name=check_adapter_name, run=uploads.run)
        check_adapter_name(upload.name)
        if upload.name == gw.settings.base_model_id:
            raise InvalidRequest(f"`{upload.name}` is the base model's name; choose another.", param="name")
        if await run(registry.has_adapter_name, tenant.id, upload.name):
            raise AdapterExists(upload.name)
        spec = await run(gw.base_spec)
        manifest = await uploads.run(partial(
            validate_files, config_path, weights_path, spec, max_bytes=gw.settings.max_upload_bytes,
            config_name=upload.config_filename, weights_name=upload.weights_filename,
            max_rank=gw.settings.engine_max_lora_rank))
        # Bounded: at most 64 targets, 4096 layers and 256-character names, well under MAX_CONFIG_BYTES.
        canonical = json.dumps(manifest.config.canonical_dict(), indent=2).encode() + b"\n"
        await uploads.run(store.write_config, staging, canonical)
        if gw.settings.engine_form:
            await uploads.run(store.write_engine_form, staging, manifest.config.scaling)
        internal_id = new_internal_id()
        async with uploads.tenant_lock(tenant.id):
            await uploads.check_final(tenant, manifest.weights_bytes)
            await uploads.run(store.commit, staging, internal_id)
            committed = internal_id
            adapter = Adapter(
                tenant_id=tenant.id, name=upload.name, internal_id=internal_id, base_model=gw.settings.base_model_id,
                r=manifest.config.r, top_k=manifest.config.top_k, routing=manifest.config.routing,
                bytes=manifest.weights_bytes, sha256=manifest.sha256, created=int(time.time()), state=READY)
            await run(registry.add_adapter, adapter)
            registered = True
        if gw.integrity is not None:
            await gw.integrity.vouch(adapter)
    except AdapterError as exc:
        gw.metrics.validation_failures.labels(tenant.name, type(exc).__name__).inc()
        raise
    finally:
        if not registered:
            with anyio.CancelScope(shield=True):
                await uploads.run(store.discard, staging)
                if committed is not None:
                    await uploads.run(store.remove, committed)
    gw.metrics.uploads.labels(tenant.name).inc()
    log.info("tenant %s registered adapter %s as %s (%d bytes)", tenant.name, adapter.name, adapter.internal_id,
             adapter.bytes)
    return adapter


async def resolve_adapter(gw: Gateway, tenant: Tenant, name: str) -> Adapter | None:
    """The tenant's ready adapter of that name (cached; dropped at once when it is deleted), or None."""
    load = partial(run, gw.registry.get_adapter, tenant.id, name)
    return await gw.adapters_by_name.get_or_load((tenant.id, name), load)


async def _purge(gw: Gateway, adapter: Adapter) -> bool:
    """Drain its requests, tombstone, evict from every engine, then remove files and row. False when an engine
    could not confirm the eviction: the folder (tombstoned) and the ``deleting`` row stay, and :func:`maintain`
    retries."""
    gw.adapters_by_name.invalidate(lambda _k, v: v.internal_id == adapter.internal_id)
    # reliability: its requests finish (or are cut) before the engines unload it (server/inflight.py)
    await gw.flights.drain(adapter.internal_id, gw.settings.delete_grace_s)
    try:
        await run(gw.store.tombstone, adapter.internal_id)
        failed = await gw.upstream.unload(adapter.internal_id)
        if failed:
            log.error("adapter %s (%s) could not be evicted from %s; its files stay until a retry succeeds",
                      adapter.internal_id, adapter.name, failed)
            return False
        await run(gw.store.remove, adapter.internal_id)
        await run(gw.registry.delete_adapter_row, adapter.internal_id)
        if gw.integrity is not None:
            gw.integrity.forget(adapter.internal_id)
        return True
    finally:
        gw.flights.reopen(adapter.internal_id)


async def delete_adapter(gw: Gateway, tenant: Tenant, name: str) -> None:
    """Delete the tenant's adapter; :class:`AdapterNotFound` if it has none of that name."""
    with anyio.CancelScope(shield=True):
        adapter = await run(gw.registry.mark_deleting, tenant.id, name)
        if adapter is None:
            raise AdapterNotFound(name)
        await _purge(gw, adapter)
    gw.metrics.deletes.labels(tenant.name).inc()


async def delete_tenant(gw: Gateway, tenant: Tenant) -> None:
    """Delete a tenant with all its adapters and keys (crash-safe: see the module docstring)."""
    with anyio.CancelScope(shield=True):
        await run(gw.registry.begin_tenant_deletion, tenant.id)
        gw.tenants_by_key.invalidate(lambda _k, v: v.id == tenant.id)
        gw.adapters_by_name.invalidate(lambda _k, v: v.tenant_id == tenant.id)
        await _finish_tenant(gw, tenant.id)
    gw.limiter.forget(tenant.id)


async def _finish_tenant(gw: Gateway, tenant_id: int) -> bool:
    for adapter in await run(partial(gw.registry.list_adapters, tenant_id, state=None)):
        await _purge(gw, adapter)
    return await run(gw.registry.finish_tenant_deletion, tenant_id)


async def finish_interrupted_deletions(gw: Gateway) -> int:
    """Complete deletions begun earlier (adapter rows in state ``deleting``, recorded tenant deletions);
    returns how many adapters were purged."""
    done = 0
    pending = [a for a in await run(partial(gw.registry.list_adapters, None, state=None)) if a.state != READY]
    for adapter in pending:
        done += await _purge(gw, adapter)
    for tenant_id in await run(gw.registry.pending_tenant_deletions):
        await _finish_tenant(gw, tenant_id)
    return done


async def maintain(gw: Gateway) -> None:
    """One maintenance pass: finish deletions, then sweep the store's leftovers not written for
    ``staging_max_age_s`` (staging folders of killed uploads, trash, adapter folders no row names)."""
    with anyio.CancelScope(shield=True):
        resumed = await finish_interrupted_deletions(gw)
        if resumed:
            log.warning("finished %d adapter deletions begun earlier", resumed)
        known = await run(gw.registry.all_internal_ids)
        await gw.uploads.run(partial(gw.store.sweep, known, min_age_s=gw.settings.staging_max_age_s,
                                     active=gw.uploads.active_staging()))


async def add_missing_engine_forms(gw: Gateway) -> int:
    """Write the engine form of every ready adapter stored without one (uploaded before the gateway wrote
    them), one at a time in the upload threads, after checking its weights against the registry's SHA-256
    (a form is never made from damaged files). A task of the app's start; returns how many it wrote."""
    if not gw.settings.engine_form:
        return 0
    written = 0
    try:
        adapters = await run(partial(gw.registry.list_adapters, None))
        missing = await gw.uploads.run(
            lambda: [a for a in adapters if not (gw.store.root / a.internal_id / ENGINE_FORM_NAME).exists()])
        if missing:
            log.info("writing the engine form of %d adapters stored without one", len(missing))
        for i, adapter in enumerate(missing, 1):
            reason, _ = await gw.uploads.run(verify, gw.store.path(adapter.internal_id), adapter)
            if reason is None and await gw.uploads.run(gw.store.add_engine_form, adapter.internal_id):
                written += 1
            if i % 100 == 0 or i == len(missing):
                log.info("engine forms: %d of %d adapters done (%d written)", i, len(missing), written)
    except Exception:  # the registry briefly unreachable: the next start tries again; serving goes on
        log.exception("writing missing engine forms stopped after %d", written)
    return written


async def maintain_forever(gw: Gateway) -> None:
    """:func:`maintain` every ``store_maintenance_interval_s`` (a task for the app's lifetime)."""
    interval = gw.settings.store_maintenance_interval_s
    while interval > 0:
        await anyio.sleep(interval)
        try:
            await maintain(gw)
        except Exception:  # a failing pass (database briefly unreachable) must not end the loop
            log.exception("store maintenance failed; retrying in %.0f s", interval)
