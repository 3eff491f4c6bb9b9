"""Deleting an adapter while requests for it are queued, with a REAL vLLM engine whose caches are tiny (one
device slot, one adapter in its CPU cache, two sequences at a time): the adapter is evicted by the others'
requests before its queued ones run, so the engine would reload it from its folder inside a step. Without the
fix the engine died there ("Loading lora ... failed: No adapter found", EngineCore fatal error).

Asserted: the engine survives, the deleted adapter's requests end with a clean 404 in OpenAI's shape (or
had completed before the delete), the other adapters' requests all succeed and keep being served, nothing of
the deleted adapter is left.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.settings import Settings

from tests.server.helpers import ServerThread, adapter_files

pytestmark = pytest.mark.slow
ADMIN_KEY = "delete-queued-admin-key-not-secret-0123456789"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_model_dir) -> Iterator[tuple[str, Settings, str]]:
    from flylora_runtime.engine.launcher import EngineConfig
    from flylora_runtime.engine.process import EngineProcess, free_port

    root = tmp_path_factory.mktemp("delete-queued")
    store = root / "store"
    store.mkdir()
    config = EngineConfig(model=str(demo_model_dir), adapter_store=str(store), port=free_port(), dtype="float32",
                          max_loras=1, max_cpu_loras=1, max_lora_rank=32, max_num_seqs=2)
    with EngineProcess(config, root / "engine.log") as engine:
        settings = Settings(_env_file=None, data_dir=root, adapter_store=store, base_model_id="SmolLM2-135M-Instruct",
                            base_model_dir=demo_model_dir, engine_urls=[engine.url], admin_key=ADMIN_KEY,
                            engine_read_timeout_s=300, max_concurrency_per_tenant=256,
                            delete_grace_s=0)  # no drain: the deletion meets requests still queued in the engine
        server = ServerThread(create_app(settings)).start()
        try:
            yield server.url, settings, engine.url
        finally:
            server.stop()
            print(engine.log_tail(20))


def _call(url: str, key: str, model: str, max_tokens: int = 24) -> tuple[str, int, dict]:
    r = httpx.post(url + "/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=300,
                   json={"model": model, "prompt": "Tell me a story about a cat.", "max_tokens": max_tokens,
                         "temperature": 0, "ignore_eos": True})
    return model, r.status_code, r.json()


def test_delete_with_queued_requests_after_eviction_fails_only_them_with_real_engine(stack, tmp_path: Path):
    url, settings, engine_url = stack
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    key = httpx.post(url + "/admin/tenants", json={"name": "queued"}, headers=admin).json()["api_key"]
    base = json.loads((settings.base_dir / "config.json").read_text())
    names = ["doomed", "other-a", "other-b"]
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=120) as c:
        for i, name in enumerate(names):
            config, weights = adapter_files(tmp_path / name, base=base, r=8, top_k=2, targets=("q_proj", "v_proj"),
                                            seed=i)
            r = c.post("/v1/adapters", data={"name": name}, files={"config": config.read_bytes(),
                                                                    "weights": weights.read_bytes()})
            assert r.status_code == 201, r.text
    for name in names:  # each is resolved and loaded once (the cache holds one: each load evicts the last)
        assert _call(url, key, name, 2)[1] == 200
    doomed_id = _internal_id(settings, "doomed")

    with ThreadPoolExecutor(48) as pool:
        futures = [pool.submit(_call, url, key, m) for _ in range(12) for m in ("other-a", "doomed", "other-b")]
        time.sleep(2.0)  # the engine runs two at a time and switches adapters: "doomed" is evicted and queued
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=120) as c:
            assert c.delete("/v1/adapters/doomed").status_code == 204
        results = [f.result() for f in futures]

    by_model: dict[str, list[tuple[int, dict]]] = {}
    for model, status, body in results:
        by_model.setdefault(model, []).append((status, body))
    assert all(s == 200 for s, _ in by_model["other-a"] + by_model["other-b"]), by_model
    doomed = by_model["doomed"]
    failed = [b for s, b in doomed if s != 200]
    assert failed, "no request for the deleted adapter was still queued: the attack was not mounted"
    assert all(s in (200, 404) for s, _ in doomed), doomed
    print(f"deleted adapter's requests: {len(doomed) - len(failed)} completed before the delete, {len(failed)} "
          "failed with 404; the others' requests: all 200")
    for body in failed:
        assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "param", "code"}, body
        # the engine refused it ("does not exist") or the gateway cut it ("was deleted while ... running")
        message = body["error"]["message"]
        assert ("does not exist" in message or "was deleted" in message) and "fl-" not in message, body
    assert httpx.get(engine_url + "/health", timeout=10).status_code == 200  # the engine survived
    for name in ("other-a", "other-b"):  # and keeps serving the others
        assert _call(url, key, name, 4)[1] == 200
    _, status, body = _call(url, key, "doomed", 2)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert not (settings.store_dir / doomed_id).exists()
    r = httpx.post(engine_url + "/v1/completions", json={"model": doomed_id, "prompt": "x", "max_tokens": 1},
                   timeout=60)
    assert r.status_code == 404  # the engine no longer serves it either


def _internal_id(settings: Settings, name: str) -> str:
    from server.registry import Registry

    registry = Registry.open(settings.db_url)
    try:
        return next(a.internal_id for a in registry.list_adapters(None, state=None) if a.name == name)
    finally:
        registry.close()
