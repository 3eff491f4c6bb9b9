"""Overload and fairness with the real engine (batch 8) behind the gateway's fair admission (8 slots, a tenant
holds at most 6, per-tenant queues of 256).

* A burst of far more requests than the engine takes gets 200 or 429 (queue full, with ``Retry-After``);
  nothing times out, nothing crashes, the engine never holds more than its batch.
* A short version of ``python -m loadtests.run fairness``: with a tenant sending 10x what the engine can take,
  the quiet tenant's requests never wait behind that backlog. Asserted on the mechanism, which does not depend
  on the machine's noise: not one quiet request waited for a slot in the gateway (only the noisy tenant's
  did), the engine's own queue stayed empty, and the quiet tenant's median time to first token stays within
  2x of its value under the same engine load from tenants within their share. The p99 promise (within 2x of
  fair load) is the benchmark's: here the gateway runs in this process beside ~90 client connections on a
  shared 2-core machine, so a 20-second run's p99 (its worst one or two requests) measures the machine's
  scheduling, not the admission (numbers printed as ``FAIRNESS REPORT``; the full run is in
  docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from loadtests.fairness import three_runs
from tests.reliability.conftest import ENGINE_BATCH, Stack, async_client, request, run
from tests.server.helpers import queued_tenants

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BURST = 400


def test_a_burst_far_over_capacity_gets_200_or_429_never_a_timeout(stack: Stack):
    stack.ensure_engine()
    key = stack.tenant("burst")
    base = stack.settings.base_model_id
    peak = {"engine": 0}

    async def main():
        async with async_client(stack.url, connections=BURST + 10, timeout=300) as client:
            async def watch():
                while True:
                    peak["engine"] = max(peak["engine"], stack.gw.admission.in_flight)
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch())
            outcomes = await asyncio.gather(*(request(client, "burst", key, base, stream=i % 4 == 0, max_tokens=4)
                                              for i in range(BURST)))
            watcher.cancel()
            return outcomes

    outcomes = run(main())
    statuses = sorted({o.status for o in outcomes})
    report = {"burst": BURST, "ok": sum(o.ok for o in outcomes), "429": sum(o.status == 429 for o in outcomes),
              "statuses": statuses, "slowest_s": round(max(o.ended - o.began for o in outcomes), 1),
              "peak_in_flight": peak["engine"]}
    print("\nBURST REPORT " + json.dumps(report))
    assert not [o.transport_error for o in outcomes if o.transport_error]
    assert set(statuses) <= {200, 429}, report
    assert report["ok"] >= 256  # at least the queue's worth was served
    for o in outcomes:
        if o.status == 429:
            assert o.error["code"] == "queue_full" and o.retry_after == "1", o
    assert peak["engine"] <= ENGINE_BATCH
    assert stack.engine.alive and stack.gw.admission.in_flight == 0 and stack.gw.admission.waiting() == 0


def test_a_quiet_tenant_keeps_its_time_to_first_token_next_to_a_noisy_one(stack: Stack):
    stack.ensure_engine()
    keys = {name: stack.tenant(name) for name in ["quiet", "noisy", *[f"fair-{i}" for i in range(6)]]}
    ids = {name: stack.gw.registry.get_tenant(name).id for name in keys}
    with queued_tenants(stack.gw.admission) as waited:  # ids of the requests that waited for a slot
        results = run(three_runs(stack.url, stack.engine.url, keys, stack.settings.base_model_id, duration_s=20,
                                 batch=ENGINE_BATCH))
    queued = Counter(waited)  # tenant id -> requests that found no free slot and had to wait in the gateway
    p50 = {name: r["quiet_ttft_s"]["p50"] for name, r in results.items()}
    p99 = {name: r["quiet_ttft_s"]["p99"] for name, r in results.items()}
    keep = ("quiet_ttft_s", "engine_running_mean", "engine_waiting_mean", "gateway_in_flight_mean",
            "gateway_waiting_mean", "load_statuses")
    print("\nFAIRNESS REPORT " + json.dumps({name: {k: r[k] for k in keep} for name, r in results.items()}))
    print("QUEUED IN THE GATEWAY " + json.dumps({name: queued.get(i, 0) for name, i in ids.items()}))
    print(f"quiet p99 TTFT noisy/fair {p99['noisy'] / p99['fair']:.2f}x (the benchmark's bound: 2x)")
    for name, r in results.items():
        assert r["quiet_failed"] == 0, (name, r["quiet_errors"])
        assert r["quiet_ttft_s"]["n"] >= 10, (name, r["quiet_ttft_s"])
        assert set(r["load_statuses"]) <= {"200", "429"}, (name, r["load_statuses"])
    noisy = results["noisy"]
    # The noisy tenant is served, its backlog waits in the gateway (not in the engine's queue) ...
    assert noisy["load_statuses"].get("200", 0) > 0
    assert noisy["gateway_waiting_mean"] > 5 * ENGINE_BATCH, noisy
    assert noisy["gateway_in_flight_mean"] <= ENGINE_BATCH
    if noisy["engine_waiting_mean"] is not None:
        assert noisy["engine_waiting_mean"] < 1.0, noisy
    # ... and only its backlog: not one of the quiet tenant's requests waited for a slot (the noisy tenant holds
    # at most its share, so a slot is always free for others), nor did the fair tenants' ...
    assert queued.get(ids["noisy"], 0) > 0, queued
    assert set(queued) == {ids["noisy"]}, {name: queued.get(i, 0) for name, i in ids.items()}
    # ... so the quiet tenant's typical first token is what it is under fair load.
    assert p50["noisy"] <= 2 * p50["fair"], p50
