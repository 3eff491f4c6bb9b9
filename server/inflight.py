"""Requests in flight per adapter, so that deleting an adapter first lets them finish, then cuts what is left.

An engine must never be told to unload an adapter (nor lose its files) while it still runs requests for it:
vLLM would reload the adapter from its path at the next step, and with the files gone its engine core dies.
And a deleted adapter's weights must never be served after its deletion returned. So a deletion
(:func:`server.adapters.delete_adapter`) first calls :meth:`AdapterFlights.drain`:

1. the adapter is closed: a request for it that has not reached the engines yet gets 404 (as after the
   deletion), whether it was waiting in the admission queue or had resolved the name just before;
2. requests already at the engines get ``grace_s`` to finish normally;
3. what still runs is cut: a request still waiting for its answer gets 404 ``model_not_found`` ("deleted
   while the request was running"), a stream that already sent events ends with that error as its last
   event. Closing the connection makes vLLM abort the request.

Only then are the engines told to unload it and its files removed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
from starlette.requests import ClientDisconnect

from server.errors import ModelNotFound

log = logging.getLogger("flylora.gateway.inflight")


class AdapterDeleted(ModelNotFound):
    """The adapter was deleted while this request was running (or waiting to run)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.message = f"The model `{name}` was deleted while this request was running."
        self.args = (self.message,)


class FlightHandle:
    """One request at the engines for one adapter: what a deletion needs to cut it."""

    __slots__ = ("internal_id", "scope", "upstream", "cut", "_ended", "_owner")

    def __init__(self, owner: AdapterFlights, internal_id: str):
        self._owner = owner
        self.internal_id = internal_id
        self.scope: anyio.CancelScope | None = None  # set while the request waits for the engine's answer
        self.upstream: Any = None  # the engine's streamed answer, once it started
        self.cut = False
        self._ended = asyncio.Event()

    def end(self) -> None:
        """The request is over (idempotent)."""
        if not self._ended.is_set():
            self._ended.set()
            self._owner._end(self)

    def request_cut(self) -> None:
        self.cut = True
        if self.scope is not None:
            self.scope.cancel()
        if self.upstream is not None:
            # The stream's reader gets an httpx error, sees `cut` and ends the stream with a clean error.
            asyncio.ensure_future(self.upstream.response.aclose())


class AdapterFlights:
    abort_settle_s = 0.5

    def __init__(self) -> None:
        self._flights: dict[str, set[FlightHandle]] = {}
        self._closed: dict[str, int] = {}  # internal id -> deletions in progress

    def begin(self, internal_id: str, name: str) -> FlightHandle:
        """Register a request for the adapter; :class:`AdapterDeleted` if it is being deleted."""
        if internal_id in self._closed:
            raise AdapterDeleted(name)
        handle = FlightHandle(self, internal_id)
        self._flights.setdefault(internal_id, set()).add(handle)
        return handle

    def _end(self, handle: FlightHandle) -> None:
        flights = self._flights.get(handle.internal_id)
        if flights is not None:
            flights.discard(handle)
            if not flights:
                del self._flights[handle.internal_id]

    def in_flight(self, internal_id: str) -> int:
        return len(self._flights.get(internal_id, ()))

    def is_closed(self, internal_id: str) -> bool:
        return internal_id in self._closed

    async def drain(self, internal_id: str, grace_s: float, cut_wait_s: float = 10.0) -> tuple[int, int]:
        """Close the adapter, let its requests finish for ``grace_s``, cut the rest and wait for them to end
        (at most ``cut_wait_s``). Returns (requests that were running, of which cut). The adapter stays closed
        until :meth:`reopen` (call it once its row is gone, in a ``finally``)."""
        self._closed[internal_id] = self._closed.get(internal_id, 0) + 1
        running = list(self._flights.get(internal_id, ()))
        if not running:
            return 0, 0
        with anyio.move_on_after(grace_s):
            for handle in running:
                await handle._ended.wait()
        left = [h for h in running if not h._ended.is_set()]
        for handle in left:
            handle.request_cut()
        with anyio.move_on_after(cut_wait_s):
            for handle in left:
                await handle._ended.wait()
        stuck = sum(not h._ended.is_set() for h in left)
        if left:
            # The engine aborts a request when its connection closes; let it do so before the unload that
            # follows (an adapter unloaded under a running request is reloaded from the store next step).
            await asyncio.sleep(self.abort_settle_s)
            log.warning("adapter %s deleted with %d requests still running after %.0f s: cut (%d did not end)",
                        internal_id, len(left), grace_s, stuck)
        return len(running), len(left)

    def reopen(self, internal_id: str) -> None:
        count = self._closed.get(internal_id, 0) - 1
        if count > 0:
            self._closed[internal_id] = count
        else:
            self._closed.pop(internal_id, None)


class RequestGuard:
    """What the proxy holds for one admitted completion request: its slot at the engines (fair admission) and,
    for an adapter, its :class:`FlightHandle`. :meth:`release` exactly once, when the request is over."""

    __slots__ = ("slot", "flight", "name")

    def __init__(self, slot: Any, flight: FlightHandle | None, name: str):
        self.slot = slot
        self.flight = flight
        self.name = name

    @classmethod
    async def enter(cls, admission: Any, flights: AdapterFlights, tenant_id: int, internal_id: str | None,
                    name: str, receive: Any = None) -> RequestGuard:
        """Wait for a slot (429 when the tenant's queue is full or the wait too long), then register the
        adapter's flight (404 when it was deleted meanwhile, the slot given back). With the ASGI ``receive``
        (the body already read), a client that hangs up while waiting gives its place back at once
        (:class:`ClientDisconnect`)."""
        slot = admission.try_enter(tenant_id)
        if slot is None:
            slot = await _wait_for_slot(admission, tenant_id, receive)
        try:
            flight = flights.begin(internal_id, name) if internal_id is not None else None
        except BaseException:
            slot.release()
            raise
        return cls(slot, flight, name)

    @property
    def cut(self) -> bool:
        return self.flight is not None and self.flight.cut

    async def answer(self, send: Any) -> Any:
        """``await send`` (the engine call), which a deletion of the adapter may cut: then 404."""
        if self.flight is None:
            return await send
        if self.flight.cut:
            send.close()
            raise AdapterDeleted(self.name)
        with anyio.CancelScope() as scope:
            self.flight.scope = scope
            try:
                return await send
            finally:
                self.flight.scope = None
        raise AdapterDeleted(self.name)

    def streaming(self, upstream: Any) -> None:
        """The engine's streamed answer started: a cut closes it."""
        if self.flight is not None:
            self.flight.upstream = upstream
            if self.flight.cut:
                self.flight.request_cut()

    def release(self) -> None:
        self.slot.release()
        if self.flight is not None:
            self.flight.end()


async def _wait_for_slot(admission: Any, tenant_id: int, receive: Any) -> Any:
    """``admission.enter``, or :class:`ClientDisconnect` as soon as the client hangs up while it waits."""
    if receive is None:
        return await admission.enter(tenant_id)
    waiter = asyncio.ensure_future(admission.enter(tenant_id))
    gone = asyncio.ensure_future(receive())
    try:
        await asyncio.wait((waiter, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        gone.cancel()
        waiter.cancel()
        await _release_if_granted(waiter)
        raise
    if waiter.done():
        gone.cancel()
        return waiter.result()  # the slot, or the wait's 429
    waiter.cancel()
    await _release_if_granted(waiter)
    raise ClientDisconnect()


async def _release_if_granted(waiter: asyncio.Future[Any]) -> None:
    try:
        slot = await waiter
    except BaseException:  # cancelled (the usual case) or a 429 nobody will read
        return
    slot.release()
