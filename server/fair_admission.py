"""Fair admission of completion requests: a global cap on requests in flight to the engines, a bounded queue
per tenant in front of it, and round-robin between tenants when a slot frees. Pure policy on asyncio futures.
(Uploads have their own gate, :mod:`server.admission`.)

Why: vLLM schedules first come, first served. A tenant that sends ten times what the engine can take fills
the engine's waiting queue, and every other tenant's request waits behind that backlog. Here the backlog
waits in the gateway instead, in that tenant's own queue, and the engine only ever holds what it can batch:

* ``max_in_flight`` requests at most are at the engines (size it to the engines' batch, ``--max-num-seqs``
  times the replicas). A request that finds a free slot, and whose tenant has nobody queued, goes at once.
* One tenant holds at most ``tenant_cap`` of those slots (``tenant_share`` of them, at least one), so a
  slot is always left for the others: a quiet tenant's request never waits for a noisy tenant's request
  to finish.
* Otherwise the request waits in its tenant's FIFO queue (at most ``queue_depth`` waiting; more: 429 at
  once). When a slot frees, tenants with waiting requests take turns (round robin, one request per turn,
  skipping tenants at their cap), so a tenant's wait depends on the number of busy tenants, not on how
  many requests the others have queued.
* A request that waited ``queue_timeout_s`` gets 429 with ``Retry-After`` (it was never sent).

Limits live in this process (as :mod:`server.limits`): with N gateway replicas the engines get N times
``max_in_flight``; size it per replica.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from server.errors import GatewayError


class QueueFull(GatewayError):
    """The tenant already has ``queue_depth`` requests waiting for the engines."""

    status, type_, code = 429, "rate_limit_error", "queue_full"


class QueueTimeout(GatewayError):
    """The request waited ``queue_timeout_s`` for a slot at the engines and was not sent."""

    status, type_, code = 429, "rate_limit_error", "queue_timeout"


@dataclass
class _Tenant:
    in_flight: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class Slot:
    """One admitted request's place at the engines; :meth:`release` exactly once (later calls do nothing)."""

    __slots__ = ("_admission", "_tenant", "released")

    def __init__(self, admission: FairAdmission | None, tenant: int):
        self._admission = admission
        self._tenant = tenant
        self.released = admission is None

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._leave(self._tenant)  # type: ignore[union-attr]


class FairAdmission:
    """Admission of completion requests by tenant id. ``max_in_flight=0`` turns it off (every request passes).

    Args:
        max_in_flight: requests in flight to all engines at most.
        tenant_share: fraction of ``max_in_flight`` one tenant may hold (at least one slot).
        queue_depth: requests one tenant may have waiting; more get :class:`QueueFull`.
        queue_timeout_s: a waiting request gets :class:`QueueTimeout` after this long.
    """

    def __init__(self, *, max_in_flight: int, tenant_share: float = 0.75, queue_depth: int = 64,
                 queue_timeout_s: float = 30.0):
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0, found {max_in_flight}")
        if not 0 < tenant_share <= 1:
            raise ValueError(f"tenant_share must be in (0, 1], found {tenant_share}")
        if queue_depth < 0:
            raise ValueError(f"queue_depth must be >= 0, found {queue_depth}")
        self.max_in_flight = max_in_flight
        self.tenant_cap = max(1, math.floor(max_in_flight * tenant_share))
        self.queue_depth = queue_depth
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        self.tenants: dict[int, _Tenant] = {}
        self._turns: deque[int] = deque()  # tenants with waiting requests, in round-robin order

    def export(self, registry: Any) -> None:
        """Gauges of the admission state on a Prometheus registry."""
        from prometheus_client import Gauge

        Gauge("flylora_gateway_admission_in_flight", "Completion requests holding a slot at the engines.",
              registry=registry).set_function(lambda: self.in_flight)
        Gauge("flylora_gateway_admission_waiting", "Completion requests waiting for a slot (all tenants).",
              registry=registry).set_function(lambda: self.waiting())

    @property
    def enabled(self) -> bool:
        return self.max_in_flight > 0

    def waiting(self, tenant: int | None = None) -> int:
        """Requests waiting (of one tenant, or of all)."""
        if tenant is not None:
            t = self.tenants.get(tenant)
            return len(t.waiting) if t else 0
        return sum(len(t.waiting) for t in self.tenants.values())

    def _state(self, tenant: int) -> _Tenant:
        t = self.tenants.get(tenant)
        if t is None:
            t = self.tenants[tenant] = _Tenant()
        return t

    def try_enter(self, tenant: int) -> Slot | None:
        """A slot at once, or None when the request would have to wait (see :meth:`enter`)."""
        if not self.enabled:
            return Slot(None, tenant)
        t = self._state(tenant)
        if not t.waiting and self.in_flight < self.max_in_flight and t.in_flight < self.tenant_cap:
            self._grant(t)
            return Slot(self, tenant)
        self._drop_if_idle(tenant, t)
        return None

    async def enter(self, tenant: int) -> Slot:
        """A slot for one request of ``tenant``: at once, or after waiting its turn; or 429."""
        slot = self.try_enter(tenant)
        if slot is not None:
            return slot
        t = self._state(tenant)
        if len(t.waiting) >= self.queue_depth:
            self._drop_if_idle(tenant, t)
            raise QueueFull(f"The service is at capacity and {len(t.waiting)} of your requests are already "
                            "waiting; retry after 1 s.", headers={"Retry-After": "1"})
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        t.waiting.append(waiter)
        if len(t.waiting) == 1:
            self._turns.append(tenant)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Granted just as the wait ended: the slot is ours; give it back before leaving.
                self._leave(tenant)
            else:
                waiter.cancel()
                self._forget_waiter(tenant, t, waiter)
            if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
                raise QueueTimeout(f"The service is at capacity: the request waited {self.queue_timeout_s:g} s "
                                   "for the engines and was not sent; retry after 1 s.",
                                   headers={"Retry-After": "1"}) from None
            raise
        return Slot(self, tenant)

    def _grant(self, t: _Tenant) -> None:
        self.in_flight += 1
        t.in_flight += 1

    def _leave(self, tenant: int) -> None:
        t = self.tenants[tenant]
        self.in_flight -= 1
        t.in_flight -= 1
        self._dispatch()
        self._drop_if_idle(tenant, t)

    def _dispatch(self) -> None:
        """Hand free slots to waiting requests, one per tenant per turn."""
        skipped = 0
        while self.in_flight < self.max_in_flight and self._turns and skipped < len(self._turns):
            tenant = self._turns[0]
            t = self.tenants[tenant]
            if t.in_flight >= self.tenant_cap:
                self._turns.rotate(-1)  # at its cap: its turn passes
                skipped += 1
                continue
            waiter = t.waiting.popleft()
            self._grant(t)
            waiter.set_result(None)
            self._turns.popleft()
            if t.waiting:
                self._turns.append(tenant)
            skipped = 0

    def _forget_waiter(self, tenant: int, t: _Tenant, waiter: asyncio.Future[None]) -> None:
        try:
            t.waiting.remove(waiter)
        except ValueError:
            pass
        if not t.waiting:
            try:
                self._turns.remove(tenant)
            except ValueError:
                pass
        self._drop_if_idle(tenant, t)

    def _drop_if_idle(self, tenant: int, t: _Tenant) -> None:
        if not t.in_flight and not t.waiting:
            self.tenants.pop(tenant, None)
