"""Admission control for uploads: what one tenant (or all of them) may have in progress and in store.

An upload is admitted before its body is read, or refused at once:

* **Concurrency**: at most ``max_uploads_per_tenant`` uploads per tenant and ``max_concurrent_uploads`` in all
  are in progress; beyond that, 429 with ``Retry-After`` (nothing waits in a queue, so a flood costs nothing).
* **Quota**: the tenant's adapters (stored, plus uploads in progress) stay within ``max_adapters_per_tenant``
  and their weight bytes (stored, plus the declared sizes of uploads in progress) within
  ``max_stored_bytes_per_tenant``; beyond that, 403. Checked again with the real size just before the
  adapter is stored, under a per-tenant lock, so parallel uploads cannot overshoot it.
* **Disk**: the store's free space, less what uploads in progress may still write, must stay above
  ``min_free_store_bytes``; otherwise 507.

Every blocking step of an upload (writing the received bytes, validating, fsync and rename) runs in the
upload threads (``upload_threads``, an anyio capacity limiter of its own), never in the default thread pool
that serves key and adapter lookups, so parallel large uploads cannot stall other tenants' requests.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anyio

from server.errors import AdapterQuotaExceeded, InsufficientStorage, UploadsBusy
from server.registry import Registry, Tenant
from server.settings import Settings
from server.store import AdapterStore

T = TypeVar("T")


@dataclass
class UploadTicket:
    """One admitted upload: what it reserved, and the staging folder it writes (never swept while held)."""

    tenant_id: int
    reserved_bytes: int
    staging: str | None = None


class UploadAdmission:
    """The gateway's upload gate (one per gateway; its counters are per process)."""

    def __init__(self, settings: Settings, store: AdapterStore, registry: Registry):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.limiter = anyio.CapacityLimiter(settings.upload_threads)
        self.in_progress = 0
        self.per_tenant: Counter[int] = Counter()
        self.reserved_bytes = 0
        self.reserved_by_tenant: Counter[int] = Counter()
        self._staging: dict[int, str] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking upload work in the upload threads."""
        return await anyio.to_thread.run_sync(partial(fn, *args), limiter=self.limiter)

    def active_staging(self) -> set[str]:
        """Staging folders of uploads in progress here (the store sweep leaves them alone)."""
        return set(self._staging.values())

    def hold_staging(self, ticket: UploadTicket, name: str) -> None:
        ticket.staging = name
        self._staging[id(ticket)] = name

    def tenant_lock(self, tenant_id: int) -> asyncio.Lock:
        lock = self._locks.get(tenant_id)
        if lock is None:
            lock = self._locks[tenant_id] = asyncio.Lock()
        return lock

    @asynccontextmanager
    async def admit(self, tenant: Tenant, reserve_bytes: int) -> AsyncIterator[UploadTicket]:
        """Admit one upload of at most ``reserve_bytes`` or raise; release everything on exit."""
        s = self.settings
        if self.per_tenant[tenant.id] >= s.max_uploads_per_tenant:
            raise UploadsBusy(f"You already have {s.max_uploads_per_tenant} uploads in progress; retry when one "
                              "has finished.")
        if self.in_progress >= s.max_concurrent_uploads:
            raise UploadsBusy("The service is receiving its maximum number of uploads; retry shortly.")
        # Taken before the first await, so that concurrent admissions see each other.
        ticket = UploadTicket(tenant_id=tenant.id, reserved_bytes=reserve_bytes)
        self.in_progress += 1
        self.per_tenant[tenant.id] += 1
        self.reserved_bytes += reserve_bytes
        self.reserved_by_tenant[tenant.id] += reserve_bytes
        try:
            count, stored = await anyio.to_thread.run_sync(self.registry.tenant_usage, tenant.id)
            self._check_quota(count + self.per_tenant[tenant.id] - 1, stored + self.reserved_by_tenant[tenant.id])
            free = await self.run(self.store.free_bytes)
            if free - self.reserved_bytes < s.min_free_store_bytes:
                raise InsufficientStorage("The adapter store is out of space; uploads are refused until space is "
                                          "freed.")
            yield ticket
        finally:
            self.in_progress -= 1
            self.per_tenant[tenant.id] -= 1
            if not self.per_tenant[tenant.id]:
                del self.per_tenant[tenant.id]
            self.reserved_bytes -= reserve_bytes
            self.reserved_by_tenant[tenant.id] -= reserve_bytes
            if not self.reserved_by_tenant[tenant.id]:
                del self.reserved_by_tenant[tenant.id]
            self._staging.pop(id(ticket), None)
            lock = self._locks.get(tenant.id)
            if lock is not None and not lock.locked() and tenant.id not in self.per_tenant:
                del self._locks[tenant.id]

    async def check_final(self, tenant: Tenant, weights_bytes: int) -> None:
        """Before storing: the tenant's stored adapters plus this one fit its quota (call under tenant_lock)."""
        count, stored = await anyio.to_thread.run_sync(self.registry.tenant_usage, tenant.id)
        self._check_quota(count, stored + weights_bytes)

    def _check_quota(self, others: int, stored_bytes: int) -> None:
        s = self.settings
        if s.max_adapters_per_tenant and others + 1 > s.max_adapters_per_tenant:
            raise AdapterQuotaExceeded(f"You may store at most {s.max_adapters_per_tenant} adapters (counting "
                                       "uploads in progress); delete one first.")
        if s.max_stored_bytes_per_tenant and stored_bytes > s.max_stored_bytes_per_tenant:
            raise AdapterQuotaExceeded(f"This upload would take your stored adapters past {s.max_stored_bytes_per_tenant}"
                                       " bytes; delete some first.", param="weights")
