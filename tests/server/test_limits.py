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
