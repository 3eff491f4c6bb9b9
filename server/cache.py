"""A small TTL + LRU cache for hot registry lookups (key -> tenant, tenant + name -> adapter).

Only hits are cached. Local changes invalidate at once; other gateway replicas see a deletion within
``ttl_s`` (and the engine refuses a deleted adapter anyway, its files being gone).

:meth:`TTLCache.get_or_load` is the hot path: a hit is one dict lookup; on a miss one load per key runs at
a time and every concurrent caller for that key awaits it (so an entry expiring under load costs one
registry query, not one per request in flight). A load that was running when :meth:`invalidate` was called
is never cached: a lookup that raced with a deletion cannot bring the deleted record back.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class TTLCache(Generic[V]):
    def __init__(self, ttl_s: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._data: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._loading: dict[Hashable, asyncio.Future[V | None]] = {}
        self._generation = 0

    def get(self, key: Hashable) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] < self.clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[1]

    def put(self, key: Hashable, value: V) -> None:
        if self.ttl_s <= 0:
            return
        self._data[key] = (self.clock() + self.ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def get_or_load(self, key: Hashable, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """The cached value, else ``await load()`` (None: not found, not cached), one load per key at a time."""
        item = self._data.get(key)
        if item is not None:
            if item[0] >= self.clock():
                self._data.move_to_end(key)
                return item[1]
            del self._data[key]
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key, load))
            self._loading[key] = pending
        # Shielded: a caller that goes away does not cancel the load the others wait for.
        return await asyncio.shield(pending)

    async def _load(self, key: Hashable, load: Callable[[], Awaitable[V | None]]) -> V | None:
        generation = self._generation
        try:
            value = await load()
        finally:
            if self._loading.get(key) is asyncio.current_task():
                del self._loading[key]
        if value is not None and generation == self._generation:
            self.put(key, value)
        return value

    def invalidate(self, predicate: Callable[[Hashable, V], bool]) -> None:
        """Drop matching entries; loads now running are not cached (they may predate the change)."""
        self._generation += 1
        self._loading.clear()
        for key in [k for k, (_, v) in self._data.items() if predicate(k, v)]:
            del self._data[key]

    def __len__(self) -> int:
        return len(self._data)
