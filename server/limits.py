"""Per-tenant admission: requests in flight and tokens per minute. Pure policy with an injectable clock.

Tokens are a bucket per tenant holding up to ``tokens_per_minute``, refilled continuously at
``tokens_per_minute / 60`` per second. A request is admitted while the bucket is above zero, checked twice:
before its body is read (:meth:`acquire`, which also takes a concurrency slot) and when the body has been
checked (:meth:`reserve`), which takes the request's worst case (prompt estimate + ``max_tokens`` per
sequence) out of the bucket at once. Requests in flight therefore hold their tokens, and a tenant cannot
start many requests on one positive balance. When the request ends, :meth:`settle` gives the reservation
back and takes what was really used (the engine's usage, or what a failed or cut-off request produced).
One request may overdraw; the next waits. ``Retry-After`` is the time until the bucket is positive again.

State lives in this process: with several gateway replicas each enforces its own share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import ConcurrencyLimited, TokenRateLimited


@dataclass
class _Bucket:
    level: float
    stamp: float


class TenantLimiter:
    """Admission control by tenant id.

    Args:
        max_concurrency: default requests in flight per tenant.
        tokens_per_minute: default token budget per tenant per minute (0: unlimited).
        clock: monotonic seconds.
    """

    def __init__(self, *, max_concurrency: int, tokens_per_minute: int, clock: Callable[[], float] = time.monotonic):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, found {max_concurrency}")
        if tokens_per_minute < 0:
            raise ValueError(f"tokens_per_minute must be >= 0, found {tokens_per_minute}")
        self.max_concurrency = max_concurrency
        self.tokens_per_minute = tokens_per_minute
        self.clock = clock
        self.in_flight: dict[int, int] = {}
        self.buckets: dict[int, _Bucket] = {}

    def _bucket(self, tenant_id: int, tpm: int) -> _Bucket:
        now = self.clock()
        bucket = self.buckets.get(tenant_id)
        if bucket is None:
            bucket = self.buckets[tenant_id] = _Bucket(level=float(tpm), stamp=now)
        else:
            bucket.level = min(float(tpm), bucket.level + (now - bucket.stamp) * tpm / 60.0)
            bucket.stamp = now
        return bucket

    @staticmethod
    def _rate_limited(bucket: _Bucket, tpm: int) -> TokenRateLimited:
        wait = max(1, math.ceil((-bucket.level + 1) * 60.0 / tpm))
        return TokenRateLimited(f"Token rate limit of {tpm} tokens per minute reached; retry after {wait} s.",
                                headers={"Retry-After": str(wait)})

    def acquire(self, tenant_id: int, *, max_concurrency: int | None = None, tokens_per_minute: int | None = None
                ) -> None:
        """Admit one request (take a slot) or raise :class:`ConcurrencyLimited` / :class:`TokenRateLimited`
        (with Retry-After). Cheap and before the body is read: a refused request costs no buffering."""
        limit = max_concurrency or self.max_concurrency
        tpm = self.tokens_per_minute if tokens_per_minute is None else tokens_per_minute
        if tpm > 0:
            bucket = self._bucket(tenant_id, tpm)
            if bucket.level <= 0:
                raise self._rate_limited(bucket, tpm)
        current = self.in_flight.get(tenant_id, 0)
        if current >= limit:
            raise ConcurrencyLimited(
                f"Too many concurrent requests: the limit is {limit} in flight; retry after 1 s.",
                headers={"Retry-After": "1"})
        self.in_flight[tenant_id] = current + 1

    def reserve(self, tenant_id: int, tokens: int, *, tokens_per_minute: int | None = None) -> None:
        """Hold ``tokens`` of an admitted request, or :class:`TokenRateLimited` if the bucket is empty by now
        (requests admitted meanwhile reserved it); the caller then releases the request's slot."""
        tpm = self.tokens_per_minute if tokens_per_minute is None else tokens_per_minute
        if tpm > 0:
            bucket = self._bucket(tenant_id, tpm)
            if bucket.level <= 0:
                raise self._rate_limited(bucket, tpm)
            bucket.level -= tokens

    def settle(self, tenant_id: int, *, reserved: int, used: int, tokens_per_minute: int | None = None) -> None:
        """A request ended: give back what it reserved, take what it used (never above a full bucket)."""
        tpm = self.tokens_per_minute if tokens_per_minute is None else tokens_per_minute
        if tpm > 0 and (reserved or used):
            bucket = self._bucket(tenant_id, tpm)
            bucket.level = min(float(tpm), bucket.level + reserved - used)

    def release(self, tenant_id: int) -> None:
        left = self.in_flight.get(tenant_id, 0) - 1
        if left > 0:
            self.in_flight[tenant_id] = left
        else:
            self.in_flight.pop(tenant_id, None)

    def charge(self, tenant_id: int, tokens: int, *, tokens_per_minute: int | None = None) -> None:
        """Take tokens out of the tenant's bucket (a request that reserved none)."""
        tpm = self.tokens_per_minute if tokens_per_minute is None else tokens_per_minute
        if tpm > 0 and tokens > 0:
            self._bucket(tenant_id, tpm).level -= tokens

    def forget(self, tenant_id: int) -> None:
        """The tenant was deleted."""
        self.buckets.pop(tenant_id, None)
        self.in_flight.pop(tenant_id, None)
