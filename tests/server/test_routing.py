"""ReplicaRouter policy: rendezvous affinity under a load bound, least in-flight for the base model, cooldown,
ejection and readmission, failover order. The router table is asserted after each transition."""

from __future__ import annotations

from collections import Counter

import pytest

from server.routing import ReplicaRouter, rendezvous_score


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


def adapter_homed_at(router: ReplicaRouter, url: str, start: int = 0) -> str:
    """An adapter id whose rendezvous home (among all replicas) is ``url``."""
    return next(a for i in range(start, start + 1000) if router.home(a := f"fl-{i:032x}") == url)


def test_needs_a_replica_and_a_sane_load_factor():
    with pytest.raises(ValueError, match="at least one"):
        ReplicaRouter([])
    with pytest.raises(ValueError, match="load_factor"):
        ReplicaRouter(["e0"], load_factor=0.5)


def test_base_requests_go_to_least_in_flight_then_least_recently_picked(clock):
    r = make(clock)
    assert [r.pick(None) for _ in range(3)] == ["e0", "e1", "e2"]  # ties rotate
    r.acquire("e0")
    r.acquire("e0")
    r.acquire("e1")
    assert table(r) == {"e0": (2, False), "e1": (1, False), "e2": (0, False)}
    assert r.route(None).url == "e2" and r.route(None).result == "base"
    r.release("e0")
    r.release("e0")
    r.release("e0")  # never negative
    assert table(r) == {"e0": (0, False), "e1": (1, False), "e2": (0, False)}


def test_adapter_goes_home_whatever_the_gateway_and_homes_spread():
    urls = ["http://a:8100", "http://b:8100", "http://c:8100"]
    one, other = ReplicaRouter(urls), ReplicaRouter(list(reversed(urls)))  # two gateway processes
    ids = [f"fl-{i:032x}" for i in range(3000)]
    homes = [one.pick(a) for a in ids]
    assert homes == [other.pick(a) for a in ids]  # no coordination needed
    assert homes == [max(urls, key=lambda u: rendezvous_score(a, u.encode())) for a in ids]
    counts = Counter(homes)
    assert all(900 < c < 1100 for c in counts.values()), counts  # ~1/3 each


def test_first_request_is_a_miss_then_hits(clock):
    r = make(clock)
    a = adapter_homed_at(r, "e1")
    assert r.route(a).url == "e1" and r.route(a).result == "affinity_miss"
    r.record_success("e1", a)
    assert r.route(a).result == "affinity_hit"
    clock.t += 61
    assert r.route(a).result == "affinity_miss"  # affinity expired (it may have been evicted since)
    assert r.route(a).url == "e1"  # still its home


def test_overloaded_home_spills_to_a_holder_then_least_loaded(clock):
    r = make(clock, load_factor=1.5, min_spill_in_flight=1)
    a = adapter_homed_at(r, "e0")
    for _ in range(4):
        r.acquire("e0")
    # bound = ceil(1.5 * (4 + 1) / 3) = 3: e0 (4 in flight) is over it.
    second = max(["e1", "e2"], key=lambda u: rendezvous_score(a, u.encode()))
    third = ({"e1", "e2"} - {second}).pop()
    r.acquire(second)
    d = r.route(a)
    assert (d.url, d.result) == (third, "affinity_miss")  # least loaded (0 vs 1 in flight)
    r.record_success(second, a)  # the second replica served it before: it is preferred
    d = r.route(a)
    assert (d.url, d.result) == (second, "affinity_hit")
    for _ in range(4):
        r.release("e0")
    assert r.route(a).url == "e0"  # back home once the load is gone


def test_spill_starts_exactly_at_the_bound(clock):
    r = make(clock, n=2, load_factor=1.5, min_spill_in_flight=1)
    a = adapter_homed_at(r, "e0")
    for _ in range(3):  # bound ceil(1.5 * (k + 1) / 2) = 1, 2, 3 with k = 0, 1, 2 in flight: home is under
        assert r.pick(a) == "e0"
        r.acquire("e0")
    assert r.pick(a) == "e1"  # 3 in flight at home, bound ceil(1.5 * 4 / 2) = 3
    r.acquire("e1")
    assert r.pick(a) == "e0"  # bound ceil(1.5 * 5 / 2) = 4


def test_no_spill_below_the_floor(clock):
    r = make(clock, n=2, load_factor=1.5, min_spill_in_flight=4)
    a = adapter_homed_at(r, "e0")
    for _ in range(4):  # the fair-share bound would spill at 3; the floor keeps 4 at home
        assert r.pick(a) == "e0"
        r.acquire("e0")
    assert r.pick(a) == "e1"


def test_failure_cools_replica_down_and_forgets_its_adapters(clock):
    r = make(clock, n=2)
    a = adapter_homed_at(r, "e0")
    r.record_success("e0", a)
    r.record_success("e1", "fl-b")
    r.record_failure("e0")
    assert table(r) == {"e0": (0, True), "e1": (0, False)}
    assert list(r.holders) == ["fl-b"]
    assert [r.pick(a) for _ in range(3)] == ["e1"] * 3
    clock.t += 5.1
    assert table(r) == {"e0": (0, False), "e1": (0, False)}
    assert r.route(a).url == "e0" and r.route(a).result == "affinity_miss"  # home again, but cold


def test_ejected_until_readmitted_and_adapters_move_back_home(clock):
    r = make(clock, n=2)
    a = adapter_homed_at(r, "e0")
    r.record_success("e0", a)
    r.eject("e0")
    clock.t += 3600
    assert table(r) == {"e0": (0, True), "e1": (0, False)} and r.is_ejected("e0")
    assert r.pick(a) == "e1"
    r.record_success("e1", a)
    r.readmit("e0")
    assert not r.is_down("e0") and not r.is_ejected("e0")
    assert r.route(a).url == "e0"  # rendezvous: the readmitted replica gets its adapters back
    r.record_failure("e0")
    assert not r.is_ejected("e0") and r.is_down("e0")  # a cooldown, not an ejection


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
    r.eject("e1")
    assert r.pick(None) in ("e0", "e1")
    assert r.pick("fl-a") in ("e0", "e1")


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
    assert list(r.holders) == ["fl-a", "fl-c"]
    r.forget("fl-a")
    assert list(r.holders) == ["fl-c"]
