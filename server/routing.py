"""Which engine replica serves a request: adapter affinity, then least in-flight, with failover.

Pure policy: no I/O, no torch, an injectable clock, so it is unit-tested alone.

* A request for an adapter goes to the replica that served that adapter within ``affinity_ttl_s`` (it
  most likely still holds it in a device slot or its CPU cache), unless that replica is excluded or
  cooling down.
* Otherwise (and for the base model) to the replica with the fewest requests in flight; ties go to the
  replica that was picked longest ago, so equal replicas share the load.
* A replica whose connection failed is cooling down for ``cooldown_s``: it is picked only when every
  replica is, so a recovered replica comes back without a separate health loop.
* Failover: the caller retries with the failed replica in ``exclude`` until :meth:`pick` returns None.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class ReplicaState:
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    last_picked: int = 0


class ReplicaRouter:
    """Adapter-affinity routing over engine replicas.

    Args:
        urls: replica base URLs, in a fixed order.
        affinity_ttl_s: how long a replica counts as holding an adapter after serving it.
        max_affinity_entries: adapters remembered (least recently used forgotten first).
        cooldown_s: how long a replica is avoided after a connection failure.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(self, urls: Iterable[str], *, affinity_ttl_s: float = 600.0, max_affinity_entries: int = 100_000,
                 cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.replicas: dict[str, ReplicaState] = {u: ReplicaState(u) for u in urls}
        if not self.replicas:
            raise ValueError("expected at least one replica URL, found none")
        self.affinity_ttl_s = affinity_ttl_s
        self.max_affinity_entries = max_affinity_entries
        self.cooldown_s = cooldown_s
        self.clock = clock
        #: adapter id -> (replica url, time it last served it); most recent last.
        self.affinity: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._picks = 0

    def is_down(self, url: str) -> bool:
        return self.replicas[url].down_until > self.clock()

    def pick(self, adapter_id: str | None, exclude: Iterable[str] = ()) -> str | None:
        """The replica for a request (None when every replica is excluded). Does not count it in flight."""
        excluded = set(exclude)
        candidates = [r for u, r in self.replicas.items() if u not in excluded]
        if not candidates:
            return None
        now = self.clock() if len(candidates) > 1 else 0.0
        up = [r for r in candidates if r.down_until <= now] or candidates
        chosen = up[0] if len(up) == 1 else None
        if chosen is None and adapter_id is not None:
            seen = self.affinity.get(adapter_id)
            if seen is not None and now - seen[1] <= self.affinity_ttl_s:
                chosen = next((r for r in up if r.url == seen[0]), None)
        if chosen is None:
            chosen = min(up, key=lambda r: (r.in_flight, r.last_picked))
        self._picks += 1
        chosen.last_picked = self._picks
        return chosen.url

    def acquire(self, url: str) -> None:
        self.replicas[url].in_flight += 1

    def release(self, url: str) -> None:
        state = self.replicas[url]
        state.in_flight = max(0, state.in_flight - 1)

    def record_success(self, url: str, adapter_id: str | None) -> None:
        """The replica answered: it is up, and (for an adapter) now holds it."""
        self.replicas[url].down_until = 0.0
        if adapter_id is None:
            return
        self.affinity[adapter_id] = (url, self.clock())
        self.affinity.move_to_end(adapter_id)
        while len(self.affinity) > self.max_affinity_entries:
            self.affinity.popitem(last=False)

    def record_failure(self, url: str) -> None:
        """The replica's connection failed: avoid it for ``cooldown_s`` and forget what it held."""
        self.replicas[url].down_until = self.clock() + self.cooldown_s
        for adapter_id in [a for a, (u, _) in self.affinity.items() if u == url]:
            del self.affinity[adapter_id]

    def forget(self, adapter_id: str) -> None:
        """The adapter was deleted."""
        self.affinity.pop(adapter_id, None)
