"""Unknown bearer keys are answered without a database query, so a flood of random keys cannot load the registry.

A key reaches the registry only when it could be a real one. In order:

1. Malformed keys (anything but ``flk-`` + 43 URL-safe characters, the form every key is made in) are refused.
2. Keys whose tenant was found within ``auth_cache_ttl_s`` are answered from the positive cache (``TTLCache``).
3. The **key directory**: the SHA-256 of every key, held in memory, loaded at start-up and reloaded every
   ``key_directory_refresh_s`` (one query for all keys), and updated at once by this gateway's own key
   creations, revocations and tenant deletions. A hash in it is looked up (that costs one query per real key
   per ``auth_cache_ttl_s``, however many requests use it).
4. A hash not in it was either never issued, or issued by another replica since the last reload. Such
   lookups are rate-limited by a token bucket (``unknown_key_lookups_per_s``, burst twice that); hashes
   found unknown are remembered in a bounded LRU (``unknown_key_cache_entries``) for ``NEGATIVE_TTL_S``.
   When the bucket is empty the key is refused without a query: a key minted on another replica then works
   here after the next directory reload at the latest.

So however many distinct random keys arrive, the registry sees at most ``unknown_key_lookups_per_s`` of
them per second (plus the burst), and tenants with real keys are never slowed by them. With the directory
turned off (``key_directory_refresh_s = 0``) every key not cached is looked up, as before this module
existed, and only repeats of an unknown key are answered from memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from server.cache import TTLCache

log = logging.getLogger("flylora.gateway")

#: How long a hash found unknown is answered from memory (a random 256-bit key never becomes valid later).
NEGATIVE_TTL_S = 300.0


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; :meth:`take` never waits."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = burst
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class KeyGuard:
    """Whether a well-formed key's hash deserves a registry lookup (see the module docstring)."""

    def __init__(self, load_hashes: Callable[[], Awaitable[set[str]]], *, refresh_s: float, lookups_per_s: float,
                 negative_entries: int, clock: Callable[[], float] = time.monotonic):
        self.load_hashes = load_hashes
        self.refresh_s = refresh_s
        self.bucket = TokenBucket(lookups_per_s, max(1.0, 2 * lookups_per_s), clock)
        self.unknown: TTLCache[bool] = TTLCache(NEGATIVE_TTL_S, max_entries=negative_entries, clock=clock)
        self.known: set[str] | None = None  # None: no directory (not loaded yet, or turned off)
        self._changes: list[tuple[str, bool]] | None = None  # local changes made while a reload runs
        self.refused = 0  # unknown keys refused without a query
        self.looked_up = 0  # unknown keys looked up through the bucket

    def admit(self, digest: str) -> bool:
        """True: look the key up in the registry. False: refuse it now (no query)."""
        if self.known is None:  # no directory (turned off): every uncached key is looked up, repeats excepted
            return self.unknown.get(digest) is None
        if digest in self.known:
            return True
        if self.unknown.get(digest) is not None or not self.bucket.take():
            self.refused += 1
            return False
        self.looked_up += 1
        return True

    def found(self, digest: str, exists: bool) -> None:
        """The outcome of a lookup :meth:`admit` let through."""
        if exists:
            self._apply(digest, True)
        else:
            self.unknown.put(digest, True)
            self._apply(digest, False)

    def added(self, digest: str) -> None:
        """A key this gateway just issued."""
        self.unknown.invalidate(lambda k, _v: k == digest)
        self._apply(digest, True)

    def removed(self, digests: set[str]) -> None:
        """Keys this gateway just revoked (or whose tenant it deleted)."""
        for digest in digests:
            self._apply(digest, False)

    def _apply(self, digest: str, present: bool) -> None:
        if self.known is not None:
            if present:
                self.known.add(digest)
            else:
                self.known.discard(digest)
        if self._changes is not None:
            self._changes.append((digest, present))

    async def reload(self) -> None:
        """Replace the directory by the registry's keys (changes made meanwhile are kept)."""
        if self.refresh_s <= 0:
            return
        self._changes = []
        try:
            fresh = await self.load_hashes()
            for digest, present in self._changes:
                (fresh.add if present else fresh.discard)(digest)
            self.known = fresh
        finally:
            self._changes = None

    async def watch(self) -> None:
        """Reload every ``refresh_s`` for the app's lifetime (a failed reload keeps the old directory)."""
        if self.refresh_s <= 0:
            return
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.reload()
            except Exception as exc:  # noqa: BLE001 - the registry may be briefly unreachable
                log.warning("could not reload the key directory: %s", type(exc).__name__)

    def stats(self) -> dict[str, Any]:
        return {"known": None if self.known is None else len(self.known), "refused": self.refused,
                "looked_up": self.looked_up, "negative_entries": len(self.unknown)}
