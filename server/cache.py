"""A small TTL + LRU cache for hot registry lookups (key -> tenant, tenant + name -> adapter).

Only hits are cached. Local changes invalidate at once; other gateway replicas see a deletion within
``ttl_s`` (and the engine refuses a deleted adapter anyway, its files being gone).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class TTLCache(Generic[V]):
    def __init__(self, ttl_s: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._data: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        if self.ttl_s <= 0:
            return None
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

    def invalidate(self, predicate: Callable[[Hashable, V], bool]) -> None:
        for key in [k for k, (_, v) in self._data.items() if predicate(k, v)]:
            del self._data[key]

    def __len__(self) -> int:
        return len(self._data)
