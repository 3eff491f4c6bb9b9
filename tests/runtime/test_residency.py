"""The residency gauges (flylora_runtime.vllm_plugin.residency) without an engine: the snapshot of a LoRA
manager's two caches (vLLM's own LRU caches; the manager around them is a stand-in), the file the worker
writes, and what the API server's collector exports from it. tests/deploy/test_residency_live.py checks the
same gauges on a running engine as adapters load and evict."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from vllm.utils.cache import LRUCache

from flylora_runtime.vllm_plugin import metrics, residency


class StandInManager(SimpleNamespace):
    """The attributes of vLLM's LRUCacheLoRAModelManager that the snapshot reads, on vLLM's LRUCache."""

    def __init__(self, slots: int, capacity: int):
        super().__init__(_registered_adapters=LRUCache(capacity), _active_adapters=LRUCache(slots),
                         lora_index_to_id=[None] * slots, lora_slots=slots)

    def load(self, lora_id: int, name: str | None) -> None:
        """Register an adapter as the FlyLoRA loader does (``flylora`` info), or a warm-up dummy (name None)."""
        model = SimpleNamespace(flylora=object()) if name else SimpleNamespace()
        self._registered_adapters[lora_id] = model
        if name:
            residency._names[lora_id] = name

    def activate(self, slot: int, lora_id: int) -> None:
        self.lora_index_to_id[slot] = lora_id
        self._active_adapters[lora_id] = None


@pytest.fixture(autouse=True)
def clean_state(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(residency, "_names", {})
    monkeypatch.setattr(residency, "_last_written", None)
    monkeypatch.setattr(residency, "_last_key", None)


def scrape(folder, limit=None) -> dict:
    registry = CollectorRegistry()
    registry.register(residency.ResidencyCollector(str(folder), limit))
    text = generate_latest(registry).decode()
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def loaded(samples: dict) -> set[tuple[str, str, str]]:
    out = set()
    for key in samples:
        if key.startswith(residency.LOADED + "{"):
            labels = json.loads(key[len(residency.LOADED):])
            assert labels["model_name"] == "base" and labels["engine"] == "0"
            out.add((labels["adapter_name"], labels["level"], labels["pinned"]))
    return out


def test_snapshot_lists_slot_holders_then_the_cache_newest_first_and_skips_dummies():
    m = StandInManager(slots=2, capacity=4)
    for i, name in [(1, "a"), (2, "b"), (3, None), (4, "d")]:
        m.load(i, name)
    m.activate(1, 4)
    m._registered_adapters.touch(1)  # a used more recently than b
    m._registered_adapters.pin(2)
    snap = residency.snapshot(m, "base")
    assert snap == {"model_name": "base", "max_gpu": 2, "adapters": [
        {"name": "d", "level": "gpu", "pinned": False},
        {"name": "a", "level": "cpu", "pinned": False},
        {"name": "b", "level": "cpu", "pinned": True}]}


def test_the_collector_exports_the_proposal_names_and_series_vanish_on_eviction(tmp_path):
    m = StandInManager(slots=1, capacity=2)
    worker = SimpleNamespace(_adapter_manager=m, _flylora_model_name="base")
    residency.publish(worker)
    idle = scrape(tmp_path)  # the counts exist from start-up, before any adapter
    assert idle == {residency.NUM_GPU + '{"engine": "0", "model_name": "base"}': 0.0,
                    residency.NUM_CPU + '{"engine": "0", "model_name": "base"}': 0.0,
                    residency.MAX_GPU + '{"engine": "0", "model_name": "base"}': 1.0}

    m.load(1, "fl-a"), m.activate(0, 1)
    residency.publish(worker)
    assert loaded(scrape(tmp_path)) == {("fl-a", "gpu", "false")}

    m.load(2, "fl-b"), m.activate(0, 2)  # one slot: the slot LRU pushes fl-a out
    residency.publish(worker)
    samples = scrape(tmp_path)
    assert loaded(samples) == {("fl-a", "cpu", "false"), ("fl-b", "gpu", "false")}
    assert samples[residency.NUM_GPU + '{"engine": "0", "model_name": "base"}'] == 1
    assert samples[residency.NUM_CPU + '{"engine": "0", "model_name": "base"}'] == 2

    del m._registered_adapters[1]  # evicted from the CPU cache: its series and its name go
    residency.publish(worker)
    assert loaded(scrape(tmp_path)) == {("fl-b", "gpu", "false")}
    assert residency._names == {2: "fl-b"}


def test_the_file_is_rewritten_only_when_residency_changes(tmp_path):
    m = StandInManager(slots=1, capacity=2)
    m.load(1, "fl-a"), m.activate(0, 1)
    worker = SimpleNamespace(_adapter_manager=m, _flylora_model_name="base")
    residency.publish(worker)
    path = tmp_path / residency.RESIDENCY_FILE
    os.utime(path, (1, 1))
    residency.publish(worker)  # same state (a step that touched the adapter again)
    assert path.stat().st_mtime == 1
    m.load(2, "fl-b")
    residency.publish(worker)
    assert path.stat().st_mtime != 1


def test_a_step_that_only_touches_slot_holders_does_not_rebuild_the_snapshot(tmp_path, monkeypatch):
    m = StandInManager(slots=2, capacity=3)
    m.load(1, "fl-a"), m.activate(0, 1)
    m.load(2, "fl-b"), m.activate(1, 2)
    worker = SimpleNamespace(_adapter_manager=m, _flylora_model_name="base")
    built = []
    real_snapshot = residency.snapshot
    monkeypatch.setattr(residency, "snapshot", lambda *a: built.append(1) or real_snapshot(*a))
    residency.publish(worker)
    assert len(built) == 1
    for lora_id in (1, 2, 1):  # what every step does to the adapters it uses: LRU touches, same residency
        m._registered_adapters.touch(lora_id)
        residency.publish(worker)
    assert len(built) == 1
    m.load(3, "fl-c")  # a CPU-only adapter: the snapshot changes
    residency.publish(worker)
    assert len(built) == 2
    assert loaded(scrape(tmp_path)) == {("fl-a", "gpu", "false"), ("fl-b", "gpu", "false"), ("fl-c", "cpu", "false")}
    m._registered_adapters.pin(3)  # a pin changes a label, so the snapshot is rebuilt
    residency.publish(worker)
    assert len(built) == 3
    assert ("fl-c", "cpu", "true") in loaded(scrape(tmp_path))


def test_a_step_publishes_once_after_all_of_its_adapters(monkeypatch):
    """vLLM calls add_adapter for every adapter of every step, from _apply_adapters: one publish per step."""
    published = []
    monkeypatch.setattr(residency, "publish", lambda worker: published.append(worker))

    class StandInWorker:  # the two vLLM methods the patch table wraps, reduced to their calls
        def add_adapter(self, lora_request):
            return True

        def _apply_adapters(self, lora_requests):
            for request in lora_requests:
                self.add_adapter(request)

    StandInWorker.add_adapter = residency.naming_add_adapter(StandInWorker.add_adapter)
    StandInWorker._apply_adapters = residency.publishing_apply_adapters(StandInWorker._apply_adapters)
    worker = StandInWorker()
    requests = [SimpleNamespace(lora_int_id=i, lora_name=f"fl-{i}") for i in range(16)]
    worker._apply_adapters(requests)
    assert published == [worker]
    assert residency._names == {i: f"fl-{i}" for i in range(16)}
    worker.add_adapter(SimpleNamespace(lora_int_id=99, lora_name="fl-99"))  # a load outside a step
    assert published == [worker, worker]


def test_per_adapter_series_are_capped_slot_holders_first_counts_stay_exact(tmp_path):
    m = StandInManager(slots=2, capacity=300)
    for i in range(1, 301):
        m.load(i, f"fl-{i}")
    m.activate(0, 1), m.activate(1, 2)
    residency.publish(SimpleNamespace(_adapter_manager=m, _flylora_model_name="base"))
    samples = scrape(tmp_path, limit=5)
    series = loaded(samples)
    assert len(series) == 5
    assert {("fl-1", "gpu", "false"), ("fl-2", "gpu", "false")} <= series
    assert {("fl-300", "cpu", "false"), ("fl-299", "cpu", "false"), ("fl-298", "cpu", "false")} <= series
    assert samples[residency.NUM_CPU + '{"engine": "0", "model_name": "base"}'] == 300
    assert len(loaded(scrape(tmp_path))) == residency.DEFAULT_MAX_SERIES


def test_no_file_or_a_broken_one_exports_nothing(tmp_path, monkeypatch):
    assert scrape(tmp_path) == {}
    (tmp_path / residency.RESIDENCY_FILE).write_text("{not json")
    assert scrape(tmp_path) == {}
    monkeypatch.setenv("FLYLORA_RESIDENCY_MAX_SERIES", "junk")
    assert residency.max_series() == residency.DEFAULT_MAX_SERIES
    monkeypatch.setenv("FLYLORA_RESIDENCY_MAX_SERIES", "7")
    assert residency.max_series() == 7
