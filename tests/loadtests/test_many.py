"""The pure parts of loadtests/many.py: generated adapters, the engine counters' parser, the RSS budget."""

from __future__ import annotations

import hashlib

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

from flylora_runtime.engine.sizing import MemoryPlan
from flylora_runtime.format.checkpoint import validate_dir
from flylora_runtime.format.modelspec import BaseModelSpec
from flylora_runtime.paths import demo_model_dir
from loadtests.many import TINY, adapter_tensors, counter_delta, ensure_tiny_adapters, parse_counters, rss_budget


def _exposition(loads: float, activations: float, hit: float, miss: float) -> str:
    """Prometheus text as the engine's collector writes it (same metric names and ``cache`` label)."""

    class Collector:
        def collect(self):
            yield CounterMetricFamily("flylora_adapter_loads", "loads", value=loads)
            yield CounterMetricFamily("flylora_adapter_activations", "activations", value=activations)
            req = CounterMetricFamily("flylora_adapter_requests", "requests", labels=["cache"])
            req.add_metric(["hit"], hit)
            req.add_metric(["miss"], miss)
            yield req

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry).decode() + 'vllm:other_total{cache="hit"} 99.0\n'


def test_parse_counters_reads_the_engine_counters_and_ignores_others():
    assert parse_counters(_exposition(3, 5, 40, 7)) == {"loads": 3.0, "activations": 5.0, "hit": 40.0, "miss": 7.0}


def test_parse_counters_without_the_plugin_gives_zeros():
    assert parse_counters("# HELP x y\nvllm:num_requests_running 2.0\n") == {
        "loads": 0.0, "activations": 0.0, "hit": 0.0, "miss": 0.0}


def test_counter_delta_counts_the_phase_and_its_miss_rate():
    d = counter_delta(parse_counters(_exposition(3, 5, 40, 10)), parse_counters(_exposition(13, 25, 70, 20)))
    assert (d["loads"], d["activations"], d["requests"]) == (10, 20, 40)
    assert d["miss_rate"] == pytest.approx(0.25)
    assert counter_delta({}, {})["miss_rate"] is None


def test_rss_budget_is_the_start_plus_the_cache_allowance():
    plan = MemoryPlan(model="m", device_type="cpu", dtype="bfloat16", max_rank=32, num_layers=30,
                      slot_bytes_per_layer={"qkv_proj": 1024}, slot_bytes=30 * 1024, device_memory=8 << 30,
                      memory_fraction=0.1, cache_adapter_bytes=2 << 20, host_memory=8 << 30, cache_fraction=0.1,
                      max_num_seqs=64, max_loras=64, max_cpu_loras=256, max_loras_source="budget",
                      max_cpu_loras_source="budget")
    b = rss_budget(plan, started_rss=4 << 30)
    assert b["cache_allowance_gib"] == pytest.approx(0.5)
    assert b["budget_gib"] == pytest.approx(4.5)
    assert b["max_cpu_loras"] == 256 and b["memory_plan"] == plan.describe()


def test_adapter_tensors_are_sparse_seeded_and_distinct():
    shapes = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (64, 16)}
    one = adapter_tensors(shapes, r=4, top_k=1, seed=1)
    again, other = adapter_tensors(shapes, r=4, top_k=1, seed=1), adapter_tensors(shapes, r=4, top_k=1, seed=2)
    a = one["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (4, 64) and (a != 0).sum(dim=1).tolist() == [16] * 4  # in // (r // top_k) per row
    assert one["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    assert all((one[k] == again[k]).all() for k in one)
    assert any((one[k] != other[k]).any() for k in one)


def test_generated_adapters_pass_the_gateway_validator(tmp_path):
    folders = ensure_tiny_adapters(3, cache=tmp_path)
    base = BaseModelSpec.from_pretrained(demo_model_dir())
    manifests = [validate_dir(f, base) for f in folders]
    assert manifests[0].config.r == TINY.r and manifests[0].config.top_k == TINY.top_k
    assert len({hashlib.sha256((f / "adapter_model.safetensors").read_bytes()).hexdigest() for f in folders}) == 3
    mtimes = [(f / "adapter_model.safetensors").stat().st_mtime_ns for f in folders]
    assert ensure_tiny_adapters(3, cache=tmp_path) == folders
    assert [(f / "adapter_model.safetensors").stat().st_mtime_ns for f in folders] == mtimes  # cached, not rewritten
