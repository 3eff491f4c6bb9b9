"""TenantLimiter: concurrency slots and the token bucket, with a fake clock."""

from __future__ import annotations

import pytest

from server.errors import ConcurrencyLimited, TokenRateLimited
from server.limits import TenantLimiter


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="max_concurrency"):
        TenantLimiter(max_concurrency=0, tokens_per_minute=1)
    with pytest.raises(ValueError, match="tokens_per_minute"):
        TenantLimiter(max_concurrency=1, tokens_per_minute=-1)


def test_concurrency_slots_per_tenant():
    lim = TenantLimiter(max_concurrency=2, tokens_per_minute=0)
    lim.acquire(1)
    lim.acquire(1)
    lim.acquire(2)
    with pytest.raises(ConcurrencyLimited) as exc:
        lim.acquire(1)
    assert exc.value.headers == {"Retry-After": "1"} and exc.value.status == 429
    assert lim.in_flight == {1: 2, 2: 1}
    lim.release(1)
    lim.acquire(1, max_concurrency=3)
    lim.acquire(1, max_concurrency=3)  # a tenant override raises the cap
    assert lim.in_flight == {1: 3, 2: 1}
    for _ in range(3):
        lim.release(1)
    assert lim.in_flight == {2: 1}


def test_token_bucket_refills_and_tells_when_to_retry():
    clock = Clock()
    lim = TenantLimiter(max_concurrency=10, tokens_per_minute=600, clock=clock)  # 10 tokens/s
    lim.acquire(7)
    lim.release(7)
    lim.charge(7, 650)  # overdraw by 50
    assert lim.buckets[7].level == -50
    with pytest.raises(TokenRateLimited) as exc:
        lim.acquire(7)
    assert exc.value.headers == {"Retry-After": "6"}  # (50 + 1) tokens at 10/s
    assert lim.in_flight == {}  # a rejected request holds no slot
    clock.t = 6.0
    lim.acquire(7)
    assert lim.buckets[7].level == pytest.approx(10)
    clock.t = 1000
    lim.release(7)
    lim.acquire(7)
    assert lim.buckets[7].level == 600  # never above one minute's worth


def test_unlimited_tokens_and_tenant_overrides():
    lim = TenantLimiter(max_concurrency=10, tokens_per_minute=0)
    lim.charge(1, 10**9)
    lim.acquire(1)  # 0 means unlimited
    assert lim.buckets == {}
    lim.charge(2, 100, tokens_per_minute=60)
    with pytest.raises(TokenRateLimited):
        lim.acquire(2, tokens_per_minute=60)
    lim.forget(2)
    assert 2 not in lim.buckets


def test_a_reservation_holds_tokens_until_it_is_settled_against_usage():
    clock = Clock()
    lim = TenantLimiter(max_concurrency=10, tokens_per_minute=600, clock=clock)
    lim.acquire(1)
    lim.reserve(1, 500)  # admitted on a positive balance, holds its worst case
    assert lim.buckets[1].level == 100
    lim.acquire(1)
    lim.reserve(1, 500)  # still positive: this one may overdraw
    assert lim.buckets[1].level == -400
    with pytest.raises(TokenRateLimited) as exc:
        lim.acquire(1)  # nothing left while both run
    assert exc.value.headers == {"Retry-After": "41"}  # (400 + 1) tokens at 10/s
    lim.settle(1, reserved=500, used=20)
    lim.settle(1, reserved=500, used=30)
    assert lim.buckets[1].level == 600 - 50  # the unused part came back
    lim.settle(1, reserved=0, used=0)
    assert lim.buckets[1].level == 550


def test_a_reservation_found_empty_is_refused_and_a_refund_never_overfills():
    clock = Clock()
    lim = TenantLimiter(max_concurrency=10, tokens_per_minute=600, clock=clock)
    lim.acquire(1)  # admitted on a full bucket, body not read yet
    lim.acquire(1)
    lim.reserve(1, 700)  # the first body read reserves more than there is
    with pytest.raises(TokenRateLimited):
        lim.reserve(1, 10)  # the second finds it empty by now
    clock.t = 120.0  # refilled to full meanwhile: the refund must not push it over a minute's worth
    lim.settle(1, reserved=700, used=5)
    assert lim.buckets[1].level == 600
    unlimited = TenantLimiter(max_concurrency=1, tokens_per_minute=0)
    unlimited.reserve(1, 10**9)
    unlimited.settle(1, reserved=10**9, used=10**9)
    assert unlimited.buckets == {}
