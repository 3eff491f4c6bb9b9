"""The key -> tenant and name -> adapter caches: one registry load per key at a time, never a stale record
after a local deletion (a deleted tenant's key and a deleted adapter stop working on the next request)."""

from __future__ import annotations

import asyncio

import pytest

from server.cache import TTLCache

from tests.server.helpers import assert_openai_error

BASE = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "hi"}]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_misses_share_one_load_and_hits_need_none():
    calls = []

    async def main() -> None:
        cache: TTLCache[str] = TTLCache(ttl_s=5)
        gate = asyncio.Event()

        async def load() -> str:
            calls.append(1)
            await gate.wait()
            return "tenant"

        waiters = [asyncio.create_task(cache.get_or_load("k", load)) for _ in range(20)]
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*waiters) == ["tenant"] * 20
        assert await cache.get_or_load("k", load) == "tenant"

    asyncio.run(main())
    assert len(calls) == 1


def test_misses_are_not_cached_and_entries_expire():
    clock = Clock()
    loads = []

    async def main() -> None:
        cache: TTLCache[str] = TTLCache(ttl_s=5, clock=clock)

        async def missing() -> None:
            loads.append("missing")

        async def found() -> str:
            loads.append("found")
            return "v"

        assert await cache.get_or_load("k", missing) is None
        assert await cache.get_or_load("k", missing) is None
        assert await cache.get_or_load("k", found) == "v"
        clock.now = 4.9
        assert await cache.get_or_load("k", found) == "v"
        clock.now = 5.1
        assert await cache.get_or_load("k", found) == "v"

    asyncio.run(main())
    assert loads == ["missing", "missing", "found", "found"]


def test_a_failed_load_reaches_every_waiter_and_is_not_cached():
    async def main() -> None:
        cache: TTLCache[str] = TTLCache(ttl_s=5)

        async def broken() -> str:
            await asyncio.sleep(0)
            raise RuntimeError("database down")

        results = await asyncio.gather(*(cache.get_or_load("k", broken) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)

        async def fine() -> str:
            return "v"

        assert await cache.get_or_load("k", fine) == "v"

    asyncio.run(main())


def test_a_load_racing_with_an_invalidation_is_not_cached():
    """A lookup that read the registry before a deletion must not put the deleted record back."""

    async def main() -> None:
        cache: TTLCache[str] = TTLCache(ttl_s=5)
        read, deleted = asyncio.Event(), asyncio.Event()

        async def stale() -> str:
            read.set()  # read the row...
            await deleted.wait()  # ...then the row is deleted and the cache invalidated
            return "deleted-tenant"

        waiter = asyncio.create_task(cache.get_or_load("k", stale))
        await read.wait()
        cache.invalidate(lambda _k, v: v == "deleted-tenant")
        deleted.set()
        assert await waiter == "deleted-tenant"  # that request had started before the deletion

        async def gone() -> None:
            return None

        assert await cache.get_or_load("k", gone) is None  # later ones see the deletion

    asyncio.run(main())


def test_a_caller_going_away_does_not_cancel_the_shared_load():
    async def main() -> None:
        cache: TTLCache[str] = TTLCache(ttl_s=5)
        gate = asyncio.Event()
        loads = []

        async def load() -> str:
            loads.append(1)
            await gate.wait()
            return "v"

        first = asyncio.create_task(cache.get_or_load("k", load))
        second = asyncio.create_task(cache.get_or_load("k", load))
        await asyncio.sleep(0)
        first.cancel()
        gate.set()
        assert await second == "v"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await cache.get_or_load("k", load) == "v" and len(loads) == 1

    asyncio.run(main())


@pytest.mark.parametrize("fast_path", [True, False])
def test_deleted_adapter_and_deleted_tenants_key_stop_working_at_once_with_fake_engine(
        make_engine, make_gateway, tmp_path, fast_path):
    engine = make_engine()
    gw = make_gateway([engine.url], completion_fast_path=fast_path)  # cache TTL: the default 5 s
    name, key = gw.new_tenant()
    assert gw.upload(key, "mine", tmp_path / "a").status_code == 201
    with gw.client(key) as c:
        for _ in range(3):  # now both lookups are cached
            assert c.post("/v1/chat/completions", json={"model": "mine", "messages": MESSAGES}).status_code == 200
        first_id = engine.state.bodies()[-1]["model"]
        assert c.delete("/v1/adapters/mine").status_code == 204
        err = assert_openai_error(c.post("/v1/chat/completions", json={"model": "mine", "messages": MESSAGES}), 404)
        assert err["code"] == "model_not_found"
    # A new adapter under the same name resolves to its own internal id at once.
    assert gw.upload(key, "mine", tmp_path / "b").status_code == 201
    with gw.client(key) as c:
        assert c.post("/v1/chat/completions", json={"model": "mine", "messages": MESSAGES}).status_code == 200
    assert engine.state.bodies()[-1]["model"] not in (first_id, "mine")
    sent = len(engine.state.requests)
    with gw.admin() as admin:
        assert admin.delete(f"/admin/tenants/{name}").status_code == 204
    with gw.client(key) as c:
        assert_openai_error(c.post("/v1/chat/completions", json={"model": BASE, "messages": MESSAGES}), 401)
        assert_openai_error(c.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 401)
    assert len(engine.state.requests) == sent
