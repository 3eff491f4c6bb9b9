"""Adapter files damaged or removed in the store behind the service's back, with the real engine: requests for
those adapters get a stable 503 ``adapter_unavailable``, every other adapter keeps serving its own output
(reloaded from the store: 5 adapters through an engine CPU cache of 2), ``GET /v1/adapters/{name}`` and the
metrics show it, and the engine process never dies (same pid, /health 200 throughout)."""

from __future__ import annotations

import random
import shutil
import time

import httpx
import pytest

from tests.reliability.conftest import Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def metric_value(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def test_damaged_and_removed_adapters_fail_cleanly_and_nothing_else_changes(stack: Stack):
    stack.ensure_engine()
    key = stack.tenant("files")
    names = ["keep-0", "keep-1", "keep-2", "bad", "gone"]
    for i, name in enumerate(names):
        assert stack.upload(key, name, seed=100 + i).status_code == 201
    expected = {}
    for name in names:
        r = stack.complete(key, name)
        assert r.status_code == 200, r.text
        expected[name] = r.json()["choices"][0]["text"]
    assert len(set(expected.values())) == len(names), expected  # five distinguishable adapters
    pid = stack.engine.process.pid
    ids = {a.name: a.internal_id for a in stack.gw.registry.list_adapters(stack.gw.registry.get_tenant("files").id)}
    store = stack.settings.store_dir
    weights = store / ids["bad"] / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])  # truncated, as by a full disk
    shutil.rmtree(store / ids["gone"])  # removed, as by an operator

    rng = random.Random(5)
    seen: dict[str, set[tuple[int, str | None]]] = {n: set() for n in names}
    for _ in range(4):  # 4 rounds over the 5 in random order: the keepers are evicted and reloaded each round
        for name in rng.sample(names, len(names)):
            r = stack.complete(key, name)
            if name in ("bad", "gone"):
                err = r.json()["error"]
                seen[name].add((r.status_code, err["code"]))
                assert ids[name] not in r.text
            else:
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == expected[name]  # its own output, nobody else's
                seen[name].add((200, None))
        assert stack.engine.alive and stack.engine.process.pid == pid
        assert httpx.get(stack.engine.url + "/health", timeout=5).status_code == 200
    assert seen["bad"] == {(503, "adapter_unavailable")} and seen["gone"] == {(503, "adapter_unavailable")}

    with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {key}"}, timeout=30) as c:
        bad, gone = c.get("/v1/adapters/bad").json(), c.get("/v1/adapters/gone").json()
        assert bad["status"] == "unavailable" and "bytes" in bad["status_details"], bad
        assert gone["status"] == "unavailable" and "missing" in gone["status_details"], gone
        assert c.get("/v1/adapters/keep-0").json()["status"] == "ready"
        assert metric_value(stack.url, "flylora_gateway_adapters_unavailable") == 2
        assert metric_value(stack.url, "flylora_gateway_adapter_integrity_failures_total", reason="size_mismatch") == 1
        assert metric_value(stack.url, "flylora_gateway_adapter_integrity_failures_total", reason="missing") == 1

        weights.write_bytes(original)  # restored from a backup: serves again by itself, its own output
        time.sleep(stack.settings.adapter_check_interval_s)  # from the next check on (GET just checked)
        r = stack.complete(key, "bad")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected["bad"], r.text
        assert c.get("/v1/adapters/bad").json()["status"] == "ready"
        for name in names:
            assert c.delete(f"/v1/adapters/{name}").status_code == 204
        assert metric_value(stack.url, "flylora_gateway_adapters_unavailable") == 0
    assert stack.engine.alive and stack.engine.process.pid == pid
