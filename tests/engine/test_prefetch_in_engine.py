"""First loads off the engine loop (flylora_runtime/vllm_plugin/prefetch.py) in the running engine: a load that
fails in the worker fails its request with a clean 400 and leaves the engine serving."""

from __future__ import annotations

import httpx
import pytest

from flylora_runtime.format.modelspec import BaseModelSpec
from tests.engine.helpers import make_adapter, unload

pytestmark = pytest.mark.slow
BASE = "SmolLM2-135M-Instruct"


def _complete(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": "The sea is", "max_tokens": 4,
                                                      "temperature": 0}, timeout=300)


def test_a_failing_load_fails_its_request_and_not_the_engine(demo_model_dir, flylora_engine) -> None:
    base = BaseModelSpec.from_pretrained(demo_model_dir)
    # Over the engine's --max-lora-rank 32: refused cleanly before it reaches the scheduler (the store resolver
    # checks the engine's limits first, 404; were it to get past it, the worker's background load refuses it,
    # 400 "could not be loaded": tests/runtime/test_prefetch.py covers that path without an engine).
    make_adapter(base, flylora_engine.store, "fl-prefetch-too-wide", r=64, top_k=8, seed=31)
    make_adapter(base, flylora_engine.store, "fl-prefetch-ok", r=16, top_k=4, seed=32, targets=("q_proj", "v_proj"))
    try:
        bad = _complete(flylora_engine.url, "fl-prefetch-too-wide")
        assert bad.status_code in (400, 404), bad.text
        assert bad.json()["error"]["message"]
        again = _complete(flylora_engine.url, "fl-prefetch-too-wide")
        assert again.status_code == bad.status_code, again.text  # again: still clean
        for model in (BASE, "fl-prefetch-ok"):  # the engine kept serving, and loads new adapters
            r = _complete(flylora_engine.url, model)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"]
        log = flylora_engine.process.log_path.read_text(errors="replace")
        assert "adapter fl-prefetch-ok loaded off the engine loop in" in log
        assert "EngineDeadError" not in log
    finally:
        unload(flylora_engine.url, "fl-prefetch-ok")
