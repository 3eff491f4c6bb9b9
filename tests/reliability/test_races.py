"""Concurrent uploads, deletes and inference on one adapter name, with the real engine.

Two random adapters with distinguishable greedy outputs (recorded first, alone) take turns under the name
``race``: each cycle two uploads race (one 201, one 409), inference runs on the name from six clients
(streamed and not), then two deletes race (one 204, one 404). Promises: never a 5xx; never a broken
connection; every answer is exactly the greedy output of an adapter that was registered under the name at
some moment of that request's life (so never another adapter's output, never the base model's, and never a
deleted adapter's after its delete returned); the registry and the store agree afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import pytest

from tests.reliability.conftest import Outcome, Stack, async_client, request, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SEEDS = (201, 202)
CYCLES = 10
TOKENS = 8


@dataclass
class Version:
    seed: int
    upload_began: float
    registered: float = 0.0  # its upload returned 201
    delete_returned: float = float("inf")


def test_upload_delete_and_inference_races_on_one_name(stack: Stack):
    stack.ensure_engine()
    key = stack.tenant("races")
    base = stack.settings.base_model_id
    expected: dict[int, str] = {}
    for seed in SEEDS:  # reference outputs, each adapter alone on the engine
        assert stack.upload(key, f"ref-{seed}", seed=seed).status_code == 201
        r = stack.complete(key, f"ref-{seed}", max_tokens=TOKENS)
        assert r.status_code == 200, r.text
        expected[seed] = r.json()["choices"][0]["text"]
    base_text = stack.complete(key, base, max_tokens=TOKENS).json()["choices"][0]["text"]
    assert len({*expected.values(), base_text}) == 3, (expected, base_text)
    by_text = {text: seed for seed, text in expected.items()}

    versions: list[Version] = []
    admin_results: list[tuple[str, int]] = []

    async def main() -> list[Outcome]:
        outcomes: list[Outcome] = []
        stop = asyncio.Event()
        rng = random.Random(17)
        headers = {"authorization": f"Bearer {key}"}
        async with async_client(stack.url) as client:

            async def infer(i: int) -> None:
                while not stop.is_set():
                    outcomes.append(await request(client, "races", key, "race", stream=i % 2 == 0,
                                                  max_tokens=TOKENS))
                    if outcomes[-1].status == 404:
                        await asyncio.sleep(0.05)

            async def upload(seed: int) -> tuple[int, float]:
                folder = stack.adapter_folder(seed)
                files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
                         "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
                r = await client.post("/v1/adapters", data={"name": "race"}, files=files, headers=headers)
                return r.status_code, time.monotonic()

            async def delete() -> tuple[int, float]:
                r = await client.delete("/v1/adapters/race", headers=headers)
                return r.status_code, time.monotonic()

            workers = [asyncio.create_task(infer(i)) for i in range(6)]
            for cycle in range(CYCLES):
                first = SEEDS[cycle % 2]
                began = time.monotonic()
                results = await asyncio.gather(upload(first), upload(SEEDS[(cycle + 1) % 2]))
                admin_results.extend(("upload", s) for s, _ in results)
                winners = [(seed, t) for (s, t), seed in zip(results, (first, SEEDS[(cycle + 1) % 2])) if s == 201]
                assert sorted(s for s, _ in results) == [201, 409], results
                version = Version(seed=winners[0][0], upload_began=began, registered=winners[0][1])
                versions.append(version)
                await asyncio.sleep(rng.uniform(0.5, 3.0))  # inference on it (and a cold load on the engine)
                results = await asyncio.gather(delete(), delete())
                admin_results.extend(("delete", s) for s, _ in results)
                assert sorted(s for s, _ in results) == [204, 404], results
                version.delete_returned = max(t for s, t in results if s == 204)
                await asyncio.sleep(rng.uniform(0, 0.5))
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 120)
        return outcomes

    outcomes = run(main())
    served = [o for o in outcomes if o.status == 200 and o.ok]
    report = {"cycles": CYCLES, "requests": len(outcomes), "served": len(served),
              "not_found": sum(o.status == 404 for o in outcomes),
              "cut_by_delete": sum(o.status == 200 and not o.ok for o in outcomes),
              "statuses": sorted({o.status for o in outcomes}),
              "admin": sorted({f"{k} {s}" for k, s in admin_results})}
    print("\nRACES REPORT " + json.dumps(report))
    assert not [o.transport_error for o in outcomes if o.transport_error]
    assert all(o.status in (200, 404) for o in outcomes), report  # never a 5xx (nor a 429 here)
    for o in outcomes:
        if o.status == 404 or (o.status == 200 and not o.ok):
            assert o.error["code"] == "model_not_found", o
    assert served and report["not_found"]
    for o in served:
        seed = by_text.get(o.text)
        assert seed is not None, f"an answer that is neither adapter's output: {o.text!r} (base: {base_text!r})"
        live = [v for v in versions if v.seed == seed and v.upload_began < o.ended and o.began < v.delete_returned]
        assert live, f"seed {seed}'s output served outside the life of every upload of it: {o}"
    # The registry and the store agree: nothing left behind, nothing lost.
    gw = stack.gw
    registered = gw.registry.all_internal_ids()
    assert gw.store.ids() == registered
    assert not [a for a in gw.registry.list_adapters(None, state=None) if a.name == "race"]
    assert gw.admission.in_flight == 0 and gw.limiter.in_flight == {}
    assert stack.engine.alive
