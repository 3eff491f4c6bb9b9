"""Which engine replica serves a request: rendezvous-hash adapter affinity under a load bound, least in
flight for the base model, ejection and readmission.

Pure policy: no I/O, no torch, an injectable clock, so it is unit-tested alone.

* **Adapter requests** go to the adapter's *home*: the available replica with the highest rendezvous score
  ``hash(adapter id, replica url)``. Every gateway replica computes the same home without talking to the
  others, an adapter stays on one engine (where it sits in the CPU cache and, while busy, in a device
  slot), and when a replica leaves or comes back only the adapters whose home it is move.
* **Load bound**: a replica is skipped while it has ``load_factor`` times its fair share of the requests
  in flight or more (consistent hashing with bounded loads), but never while it has fewer than
  ``min_spill_in_flight`` (an engine batches: one more request costs it little, while a spill costs a
  cold adapter load elsewhere); the request then goes to the next replica in the adapter's rendezvous
  order that already served the adapter, else the least loaded one under the bound. A hot adapter
  therefore spills onto a second engine instead of queueing behind one.
* **Base-model requests** go to the replica with the fewest requests in flight; ties go to the replica
  picked longest ago, so equal replicas share the load.
* **Down replicas**: a connection failure puts a replica in cooldown for ``cooldown_s`` (and forgets which
  adapters it held: a restarted engine holds none); the gateway's active health check ejects a replica
  whose ``/health`` keeps failing until a probe succeeds again (:meth:`eject` / :meth:`readmit`). A down
  replica is picked only when every replica is down.
* **Failover**: the caller retries with the failed replica in ``exclude``; :meth:`route` returns None when
  every replica is excluded.

Each decision says whether it is an ``affinity_hit`` (the chosen replica served this adapter within
``affinity_ttl_s`` and has not failed since, so it very likely still holds it), an ``affinity_miss``
(it did not: the adapter's first request there, or its holders are down or over the bound) or ``base``.
These are the router's beliefs; the engines' own ``flylora_adapter_loads_total`` is the ground truth.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

Result = Literal["affinity_hit", "affinity_miss", "base"]


@dataclass
class ReplicaState:
    url: str
    in_flight: int = 0
    #: monotonic time until which the replica is avoided (cooldown after a failure; inf while ejected).
    down_until: float = 0.0
    last_picked: int = 0
    key: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        self.key = self.url.encode()


@dataclass(frozen=True)
class Decision:
    """Where one request goes and why."""

    url: str
    result: Result


def rendezvous_score(adapter_id: str, replica_key: bytes) -> int:
    """The replica's rendezvous (highest-random-weight) score for an adapter: stable across processes."""
    digest = hashlib.blake2b(adapter_id.encode() + b"\0" + replica_key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


class ReplicaRouter:
    """Adapter-affinity routing over engine replicas.

    Args:
        urls: replica base URLs, in a fixed order.
        affinity_ttl_s: how long a replica counts as holding an adapter after serving it.
        max_affinity_entries: adapters remembered (least recently used forgotten first).
        cooldown_s: how long a replica is avoided after a connection failure.
        load_factor: a replica is skipped for an adapter while its requests in flight reach this many
            times the fair share (``ceil(load_factor * (in flight on available replicas + 1) / available)``)
        min_spill_in_flight: ... but never while it has fewer requests in flight than this.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(self, urls: Iterable[str], *, affinity_ttl_s: float = 600.0, max_affinity_entries: int = 100_000,
                 cooldown_s: float = 5.0, load_factor: float = 1.5, min_spill_in_flight: int = 8,
                 clock: Callable[[], float] = time.monotonic):
        self.replicas: dict[str, ReplicaState] = {u: ReplicaState(u) for u in urls}
        if not self.replicas:
            raise ValueError("expected at least one replica URL, found none")
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1, found {load_factor}")
        self.affinity_ttl_s = affinity_ttl_s
        self.max_affinity_entries = max_affinity_entries
        self.cooldown_s = cooldown_s
        self.load_factor = load_factor
        self.min_spill_in_flight = min_spill_in_flight
        self.clock = clock
        #: adapter id -> {replica url: time it last served the adapter}; most recently used adapter last.
        self.holders: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._picks = 0

    # --- state ---------------------------------------------------------------------------------------------
    def is_down(self, url: str) -> bool:
        return self.replicas[url].down_until > self.clock()

    def is_ejected(self, url: str) -> bool:
        return self.replicas[url].down_until == math.inf

    def all_down(self) -> bool:
        """Every replica is in cooldown or ejected."""
        now = self.clock()
        return all(r.down_until > now for r in self.replicas.values())

    def holds(self, url: str, adapter_id: str, now: float | None = None) -> bool:
        """Did ``url`` serve ``adapter_id`` within the affinity TTL (and not fail since)?"""
        seen = self.holders.get(adapter_id, {}).get(url)
        return seen is not None and (self.clock() if now is None else now) - seen <= self.affinity_ttl_s

    def home(self, adapter_id: str, urls: Iterable[str] | None = None) -> str:
        """The adapter's home among ``urls`` (default: every replica), ignoring load and health."""
        states = [self.replicas[u] for u in (urls if urls is not None else self.replicas)]
        return max(states, key=lambda r: rendezvous_score(adapter_id, r.key)).url

    # --- decisions ----------------------------------------------------------------------------------------
    def pick(self, adapter_id: str | None, exclude: Iterable[str] = ()) -> str | None:
        """The replica for a request (None when every replica is excluded). Does not count it in flight."""
        decision = self.route(adapter_id, exclude)
        return None if decision is None else decision.url

    def route(self, adapter_id: str | None, exclude: Iterable[str] = ()) -> Decision | None:
        """Like :meth:`pick`, with the reason (see the module docstring)."""
        excluded = set(exclude)
        candidates = [r for u, r in self.replicas.items() if u not in excluded]
        if not candidates:
            return None
        now = self.clock()
        up = [r for r in candidates if r.down_until <= now] or candidates
        if adapter_id is None:
            chosen = min(up, key=lambda r: (r.in_flight, r.last_picked))
            result: Result = "base"
        else:
            chosen = self._for_adapter(adapter_id, up, now)
            result = "affinity_hit" if self.holds(chosen.url, adapter_id, now) else "affinity_miss"
        self._picks += 1
        chosen.last_picked = self._picks
        return Decision(chosen.url, result)

    def _for_adapter(self, adapter_id: str, up: list[ReplicaState], now: float) -> ReplicaState:
        if len(up) == 1:
            return up[0]
        ranked = sorted(up, key=lambda r: rendezvous_score(adapter_id, r.key), reverse=True)
        bound = max(self.min_spill_in_flight,
                    math.ceil(self.load_factor * (sum(r.in_flight for r in up) + 1) / len(up)))
        if ranked[0].in_flight < bound:
            return ranked[0]
        under = [r for r in ranked[1:] if r.in_flight < bound]  # never empty: the least loaded is under
        holding = [r for r in under if self.holds(r.url, adapter_id, now)]
        if holding:
            return holding[0]
        return min(under or ranked, key=lambda r: (r.in_flight, r.last_picked))

    # --- book-keeping -------------------------------------------------------------------------------------
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
        seen = self.holders.get(adapter_id)
        if seen is None:
            seen = self.holders[adapter_id] = {}
        seen[url] = self.clock()
        self.holders.move_to_end(adapter_id)
        while len(self.holders) > self.max_affinity_entries:
            self.holders.popitem(last=False)

    def record_failure(self, url: str) -> None:
        """The replica's connection failed: avoid it for ``cooldown_s`` and forget what it held."""
        state = self.replicas[url]
        state.down_until = max(state.down_until, self.clock() + self.cooldown_s)
        self._forget_replica(url)

    def eject(self, url: str) -> None:
        """The active health check gave up on the replica: avoid it until :meth:`readmit`."""
        self.replicas[url].down_until = math.inf
        self._forget_replica(url)

    def readmit(self, url: str) -> None:
        """The replica's health check passes again: route to it (it holds no adapter yet)."""
        self.replicas[url].down_until = 0.0

    def forget(self, adapter_id: str) -> None:
        """The adapter was deleted."""
        self.holders.pop(adapter_id, None)

    def _forget_replica(self, url: str) -> None:
        for adapter_id in [a for a, seen in self.holders.items() if url in seen]:
            seen = self.holders[adapter_id]
            del seen[url]
            if not seen:
                del self.holders[adapter_id]
