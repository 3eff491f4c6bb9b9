"""ReplicaRouter policy: affinity, least in-flight, cooldown after failure, failover order. The whole
router table is asserted after each transition."""

from __future__ import annotations

import pytest

from server.routing import ReplicaRouter


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def table(router: ReplicaRouter) -> dict[str, tuple[int, bool]]:
    return {u: (r.in_flight, router.is_down(u)) for u, r in router.replicas.items()}


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, n: int = 3, **kw) -> ReplicaRouter:
    return ReplicaRouter([f"e{i}" for i in range(n)], clock=clock, affinity_ttl_s=60, cooldown_s=5, **kw)


def test_needs_a_replica():
    with pytest.raises(ValueError, match="at least one"):
        ReplicaRouter([])


def test_least_in_flight_then_least_recently_picked(clock):
    r = make(clock)
    assert [r.pick(None) for _ in range(3)] == ["e0", "e1", "e2"]  # ties rotate
    r.acquire("e0")
    r.acquire("e0")
    r.acquire("e1")
    assert table(r) == {"e0": (2, False), "e1": (1, False), "e2": (0, False)}
    assert r.pick(None) == "e2"
    r.release("e0")
    r.release("e0")
    r.release("e0")  # never negative
    assert table(r) == {"e0": (0, False), "e1": (1, False), "e2": (0, False)}


def test_affinity_wins_over_load_until_ttl(clock):
    r = make(clock)
    r.record_success("e2", "fl-a")
    r.acquire("e2")
    r.acquire("e2")
    assert r.pick("fl-a") == "e2"  # busier, but it holds the adapter
    assert r.pick("fl-b") in ("e0", "e1")  # unknown adapter: least loaded
    clock.t += 61
    assert r.pick("fl-a") in ("e0", "e1")  # affinity expired
    assert r.affinity == {"fl-a": ("e2", 100.0)}


def test_failure_cools_replica_down_and_forgets_its_adapters(clock):
    r = make(clock, n=2)
    r.record_success("e0", "fl-a")
    r.record_success("e1", "fl-b")
    r.record_failure("e0")
    assert table(r) == {"e0": (0, True), "e1": (0, False)}
    assert list(r.affinity) == ["fl-b"]
    assert [r.pick("fl-a") for _ in range(3)] == ["e1"] * 3
    clock.t += 5.1
    assert table(r) == {"e0": (0, False), "e1": (0, False)}
    assert r.pick(None) == "e0"  # back in rotation after the cooldown


def test_failover_walks_every_replica_once_then_gives_up(clock):
    r = make(clock)
    tried: list[str] = []
    while (url := r.pick("fl-a", exclude=tried)) is not None:
        tried.append(url)
        r.record_failure(url)
    assert sorted(tried) == ["e0", "e1", "e2"]
    assert all(down for _, down in table(r).values())


def test_all_down_still_picks_one(clock):
    r = make(clock, n=2)
    r.record_failure("e0")
    r.record_failure("e1")
    assert r.pick(None) in ("e0", "e1")


def test_success_clears_down_state(clock):
    r = make(clock, n=2)
    r.record_failure("e1")
    r.record_success("e1", None)
    assert table(r) == {"e0": (0, False), "e1": (0, False)}


def test_affinity_table_is_bounded_lru(clock):
    r = make(clock, max_affinity_entries=2)
    r.record_success("e0", "fl-a")
    r.record_success("e1", "fl-b")
    r.record_success("e0", "fl-a")  # refresh a
    r.record_success("e2", "fl-c")  # evicts b, the least recently used
    assert list(r.affinity) == ["fl-a", "fl-c"]
    r.forget("fl-a")
    assert list(r.affinity) == ["fl-c"]
