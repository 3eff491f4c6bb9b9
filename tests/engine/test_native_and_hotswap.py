"""k = r with d = 0 equals vLLM's native LoRA; 50 adapters hot-swapped through 4 slots; unload frees memory."""

from __future__ import annotations

import random
import time

import httpx
import pytest

import torch

from flylora_runtime.weights.dense import FlyLoRAAdapter, ModuleWeights
from flylora_runtime.format.config import FlyLoRAConfig
from flylora_runtime.engine.launcher import EngineConfig
from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter
from flylora_runtime.engine.process import EngineProcess, free_port

from tests.engine.helpers import PROMPTS, Oracle, complete_many, make_adapter, unload

pytestmark = pytest.mark.slow
BASE = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def oracle(demo_model_dir) -> Oracle:
    return Oracle(demo_model_dir)


def test_top_k_equal_r_zero_bias_equals_vllm_native_lora(oracle, flylora_engine, demo_model_dir, tmp_path):
    """Same weights, same engine settings: our FlyLoRA layers with k = r, d = 0 vs stock vLLM LoRA ops."""
    native_dir = tmp_path / "native"
    names = ["fl-native-plain", "fl-native-fly"]
    for i, name in enumerate(names):
        plain = generate_adapter(oracle.base, GenerateSpec(r=32, top_k=None, lora_alpha=64, b_std=0.03, seed=40 + i),
                                 base_name=BASE)
        plain.save(native_dir / name)  # stock vLLM reads plain PEFT LoRA
        if name.endswith("plain"):
            plain.save(flylora_engine.store / name)
        else:  # the same weights in the authors' FlyLoRA format, with top_k = r and a zero routing bias
            raw = {**plain.config.to_dict(), "top_k": 32, "bias_u": 0.001, "init_lora_weights": "sparse"}
            fly = FlyLoRAAdapter(config=FlyLoRAConfig.from_dict(raw), modules={
                m: ModuleWeights(A=w.A, B=w.B, d=torch.zeros(32)) for m, w in plain.modules.items()})
            fly.save(flylora_engine.store / name)

    calls = [(n, oracle.chat_ids(p)) for p in PROMPTS for n in names]
    ours = complete_many(flylora_engine.url, calls, 32, logprobs=True)
    for n in names:
        unload(flylora_engine.url, n)

    config = EngineConfig(model=str(demo_model_dir), adapter_store=str(tmp_path / "unused"), port=free_port(),
                          dtype="float32", max_loras=4, max_cpu_loras=16, flylora=False)
    with EngineProcess(config, tmp_path / "native.log") as native:
        for n in names:
            r = httpx.post(native.url + "/v1/load_lora_adapter",
                           json={"lora_name": n, "lora_path": str(native_dir / n)}, timeout=120)
            assert r.status_code == 200, r.text
        theirs = complete_many(native.url, calls, 32, logprobs=True)

    base_only = complete_many(flylora_engine.url, [(BASE, ids) for _, ids in calls[::2]], 32)
    assert sum(o["tokens"] != b["tokens"] for o, b in zip(ours[::2], base_only)) >= 4, "adapters must matter"
    for (name, _), o, t in zip(calls, ours, theirs):
        assert o["tokens"] == t["tokens"], name
        assert max(abs(a - b) for a, b in zip(o["logprobs"], t["logprobs"])) < 1e-3, name


def test_fifty_adapters_through_four_slots_and_unload_frees_memory(oracle, flylora_engine):
    """50 adapters in random order, 4 device slots, a 16-adapter CPU cache: each answer is its own oracle's."""
    rng = random.Random(7)
    names = [f"fl-swap-{i:02d}" for i in range(50)]
    adapters = {
        # full size (r=32, k=8, seven projections: ~39 MB fp32 each), so 16 cached adapters move the RSS by far
        # more than the 10% tolerance and the unload check can fail
        n: make_adapter(oracle.base, flylora_engine.store, n, r=32, top_k=8, lora_alpha=64, d_std=0.05, b_std=0.15,
                        seed=100 + i)
        for i, n in enumerate(names)
    }
    ids = oracle.chat_ids("Tell me a short story about a dragon.")
    max_tokens = 8
    expected = dict(zip(names, oracle.generate(ids, names, adapters, max_tokens)))
    # Most adapters must answer differently, or a response served with the wrong adapter could go unnoticed.
    assert len({tuple(v) for v in expected.values()}) >= 30

    complete_many(flylora_engine.url, [(BASE, ids)], 4)  # warm: base path only
    rss_before = flylora_engine.process.rss_bytes()

    order = names * 2  # every adapter twice: the second time it has usually been evicted
    rng.shuffle(order)
    t0 = time.monotonic()
    got = complete_many(flylora_engine.url, [(n, ids) for n in order], max_tokens, workers=8)
    elapsed = time.monotonic() - t0
    rss_loaded = flylora_engine.process.rss_bytes()
    wrong = [n for n, g in zip(order, got) if g["tokens"] != expected[n]]
    assert not wrong, f"{len(wrong)}/{len(order)} responses differ from their adapter's oracle: {wrong[:10]}"

    statuses = {n: unload(flylora_engine.url, n) for n in names}
    assert set(statuses.values()) == {200}, statuses
    time.sleep(2)
    rss_after = flylora_engine.process.rss_bytes()
    print(f"\n50 adapters x2 in {elapsed:.1f} s; engine RSS before {rss_before / 2**20:.0f} MiB, loaded "
          f"{rss_loaded / 2**20:.0f} MiB, after unloading {rss_after / 2**20:.0f} MiB ({rss_after / rss_before:.3f}x)")
    assert rss_loaded - rss_before > 0.10 * rss_before, "the cached adapters should be visible in the RSS"
    assert abs(rss_after - rss_before) <= 0.10 * rss_before
