"""FairAdmission (server/fair_admission.py): the global cap, the per-tenant cap, bounded queues, round robin."""

from __future__ import annotations

import asyncio

import pytest

from server.fair_admission import FairAdmission, QueueFull, QueueTimeout


def run(coro):
    return asyncio.run(coro)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_off_admits_everything():
    async def main():
        a = FairAdmission(max_in_flight=0)
        slots = [await a.enter(1) for _ in range(1000)]
        assert a.in_flight == 0 and not a.enabled
        for s in slots:
            s.release()

    run(main())


def test_global_cap_then_queue_then_429_when_the_queue_is_full():
    async def main():
        a = FairAdmission(max_in_flight=2, tenant_share=1.0, queue_depth=2, queue_timeout_s=5)
        s1, s2 = await a.enter(1), await a.enter(1)
        waiting = [asyncio.ensure_future(a.enter(1)) for _ in range(2)]
        await settle()
        assert a.waiting(1) == 2 and a.in_flight == 2
        with pytest.raises(QueueFull) as err:
            await a.enter(1)
        assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"
        s1.release()
        await settle()
        assert waiting[0].done() and not waiting[1].done() and a.in_flight == 2  # FIFO within a tenant
        s2.release()
        s3 = await waiting[0]
        s4 = await waiting[1]
        s3.release()
        s4.release()
        s3.release()  # a second release does nothing
        assert a.in_flight == 0 and a.tenants == {}

    run(main())


def test_a_tenant_never_holds_more_than_its_share():
    async def main():
        a = FairAdmission(max_in_flight=8, tenant_share=0.75, queue_depth=100, queue_timeout_s=5)
        assert a.tenant_cap == 6
        noisy = [asyncio.ensure_future(a.enter(1)) for _ in range(50)]
        await settle()
        assert a.tenants[1].in_flight == 6 and a.waiting(1) == 44
        quiet = await asyncio.wait_for(a.enter(2), 0.1)  # a free slot is left for others: no wait at all
        assert a.in_flight == 7
        quiet.release()
        for f in noisy:
            f.cancel()

    run(main())


def test_round_robin_between_tenants_whatever_their_backlog():
    async def main():
        a = FairAdmission(max_in_flight=2, tenant_share=1.0, queue_depth=100, queue_timeout_s=5)
        holders = [await a.enter(0), await a.enter(0)]
        order: list[int] = []

        async def one(tenant: int) -> None:
            slot = await a.enter(tenant)
            order.append(tenant)
            await asyncio.sleep(0)
            slot.release()

        tasks = [asyncio.ensure_future(one(1)) for _ in range(20)]  # noisy: 20 queued first
        await settle()
        tasks += [asyncio.ensure_future(one(2)) for _ in range(3)]  # quiet: 3, queued after all of them
        await settle()
        for h in holders:
            h.release()
        await asyncio.gather(*tasks)
        # The quiet tenant's requests are served in the first turns, not after the noisy backlog.
        assert [i for i, t in enumerate(order) if t == 2] == [1, 3, 5], order

    run(main())


def test_queue_timeout_is_429_and_frees_the_place():
    async def main():
        a = FairAdmission(max_in_flight=1, queue_depth=5, queue_timeout_s=0.05)
        held = await a.enter(1)
        with pytest.raises(QueueTimeout) as err:
            await a.enter(2)
        assert err.value.status == 429 and err.value.code == "queue_timeout"
        assert a.waiting() == 0
        held.release()
        assert a.in_flight == 0 and a.tenants == {}

    run(main())


def test_a_cancelled_waiter_gives_its_place_back():
    async def main():
        a = FairAdmission(max_in_flight=1, queue_depth=5, queue_timeout_s=5)
        held = await a.enter(1)
        waiter = asyncio.ensure_future(a.enter(2))
        await settle()
        waiter.cancel()
        await settle()
        assert a.waiting() == 0
        held.release()
        assert a.in_flight == 0 and a.tenants == {}

    run(main())


def test_a_waiter_cancelled_as_it_is_granted_releases_the_slot():
    async def main():
        a = FairAdmission(max_in_flight=1, queue_depth=5, queue_timeout_s=5)
        held = await a.enter(1)
        waiter = asyncio.ensure_future(a.enter(2))
        await settle()
        held.release()  # grants the waiter's future ...
        waiter.cancel()  # ... but its task is cancelled before it resumes
        try:
            slot = await waiter  # asyncio may still hand over the granted slot; then its owner releases it
        except asyncio.CancelledError:
            assert a.in_flight == 0
        else:
            assert a.in_flight == 1
            slot.release()
        assert a.in_flight == 0 and a.tenants == {}

    run(main())


@pytest.mark.parametrize("bad", [{"max_in_flight": -1}, {"max_in_flight": 4, "tenant_share": 0},
                                 {"max_in_flight": 4, "tenant_share": 1.5}, {"max_in_flight": 4, "queue_depth": -1}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        FairAdmission(**bad)
