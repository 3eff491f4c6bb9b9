"""The engine's slot and cache counts sized from memory (flylora_runtime/engine/sizing.py; no engine started)."""

from __future__ import annotations

import json

import pytest

from flylora_runtime.engine import sizing
from flylora_runtime.engine.launcher import EngineConfig, build_parser, sized
from flylora_runtime.format.modelspec import LLAMA_3_1_8B, BaseModelSpec

GiB, MiB = 2**30, 2**20
SMOL = BaseModelSpec.from_hf_config({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                                     "num_hidden_layers": 30})


def _plan(spec=LLAMA_3_1_8B, **kw):
    args = dict(model="m", dtype="bfloat16", max_rank=32, max_num_seqs=64, max_loras=0, max_cpu_loras=0,
                memory_fraction=0.1, cache_fraction=0.1, device_type="cuda", device_memory=80 * GiB,
                host_memory=256 * GiB)
    args.update(kw)
    return sizing.plan(spec, **args)


def test_gpu_slot_bytes_are_the_dense_layout_by_hand() -> None:
    """On a GPU the plugin stores A dense fp32 ``[n*R, in]``, B^T in the LoRA dtype ``[R, sum(out)]``, d fp32
    ``[n*R]``, k and r int32 ``[n]``, one magnitude byte, per slot and adapted layer."""
    R = 32
    by_hand = {}
    for name, projections in sizing.LAYER_KINDS:
        n, n_in = len(projections), LLAMA_3_1_8B.shapes[projections[0]][0]
        outs = sum(LLAMA_3_1_8B.shapes[p][1] for p in projections)
        by_hand[name] = n * R * n_in * 4 + R * outs * 2 + n * R * 4 + 2 * n * 4 + 1
    got = sizing.slot_bytes_per_layer(LLAMA_3_1_8B, R, "bfloat16", "cuda")
    assert got == by_hand
    # qkv of Llama-3.1-8B: 96 rows of 4096 fp32 (1.5 MiB) + 32 x 6144 bf16 (384 KiB) + small
    assert got["qkv_proj"] == 96 * 4096 * 4 + 32 * 6144 * 2 + 96 * 4 + 25
    plan = _plan()
    assert plan.slot_bytes == 32 * sum(by_hand.values())
    assert 230 * MiB < plan.slot_bytes < 240 * MiB  # the figure docs/BENCHMARKS.md quotes (236 MiB)


def test_cpu_slot_bytes_follow_the_compiled_kernels_packed_layout() -> None:
    from flylora_runtime.kernels import native

    if native.library() is None:
        pytest.skip("the compiled CPU kernel is unavailable here: the CPU layout is the dense one")
    R = 32
    got = sizing.slot_bytes_per_layer(SMOL, R, "bfloat16", "cpu")
    # packed qkv: int16 indices + bf16 values [96, 576], int16 masks [96, 36], a_nnz int32 [3], B bf16 32 x 960
    assert got["qkv_proj"] == 96 * 576 * (2 + 2) + 96 * 36 * 2 + 3 * 4 + 32 * 960 * 2 + 96 * 4 + 2 * 3 * 4 + 1
    # an fp32 engine keeps fp32 A values and fp32 B
    fp32 = sizing.slot_bytes_per_layer(SMOL, R, "float32", "cpu")["qkv_proj"]
    assert fp32 == got["qkv_proj"] + 96 * 576 * 2 + 32 * 960 * 2


def test_slots_fill_the_budget_up_to_max_num_seqs() -> None:
    plan = _plan()  # 8 GiB of an 80 GiB GPU, 236 MiB a slot
    assert plan.max_loras == 8 * GiB // plan.slot_bytes == 34
    assert plan.max_loras_source == "budget"
    assert _plan(memory_fraction=0.25).max_loras == 64  # 20 GiB would hold 86: capped at max_num_seqs
    assert _plan(memory_fraction=0.25, max_num_seqs=128).max_loras == 86
    assert _plan(device_memory=1 * GiB).max_loras == 1  # not even one fits: one anyway
    # the small demo model: 64 slots (as many as sequences) in a tenth of 24 GiB
    assert _plan(SMOL, device_type="cpu", device_memory=24 * GiB, host_memory=24 * GiB).max_loras == 64


def test_cpu_cache_fills_its_budget_and_holds_at_least_the_slots() -> None:
    plan = _plan()
    # vLLM's A [32, in] and B [out, 32] per projection in bf16, d fp32; no slot image on a GPU
    numbers = sum(32 * (i + o) for i, o in LLAMA_3_1_8B.shapes.values()) * 32
    assert plan.cache_adapter_bytes == numbers * 2 + 4 * 32 * 7 * 32
    assert plan.max_cpu_loras == int(0.1 * 256 * GiB) // plan.cache_adapter_bytes == 163
    assert _plan(host_memory=8 * GiB).max_cpu_loras == plan.max_loras  # never fewer than the slots
    cpu = _plan(SMOL, device_type="cpu", device_memory=24 * GiB, host_memory=24 * GiB)
    assert cpu.cache_adapter_bytes > sum(32 * (i + o) for i, o in SMOL.shapes.values()) * 30 * 2  # + the image


def test_explicit_counts_override_their_part() -> None:
    plan = _plan(max_loras=8)
    assert (plan.max_loras, plan.max_loras_source, plan.max_cpu_loras_source) == (8, "explicit", "budget")
    assert _plan(max_cpu_loras=16).max_loras == 16  # vLLM needs max_cpu_loras >= max_loras
    plan = _plan(max_loras=4, max_cpu_loras=9)
    assert (plan.max_loras, plan.max_cpu_loras) == (4, 9)


def test_the_arithmetic_is_printed() -> None:
    text = "\n".join(_plan().describe())
    assert "one FlyLoRA slot = 32 layers x" in text and "236.0 MiB" in text
    assert "0.1 x 80.0 GiB GPU memory = 8.00 GiB / 236.0 MiB = 34 slots; --max-loras 34" in text
    assert "34 slots < 64 sequences" in text  # says why a batch cannot hold as many adapters as sequences
    assert "--max-loras 4 set explicitly" in "\n".join(_plan(max_loras=4).describe())


def test_lora_dtype_resolves_auto_as_vllm_does() -> None:
    assert sizing.lora_dtype("auto", {"dtype": "float32"}) == "bfloat16"  # fp32 checkpoints served in 16 bits
    assert sizing.lora_dtype("auto", {"torch_dtype": "float16"}) == "float16"
    assert sizing.lora_dtype("float32", {"dtype": "bfloat16"}) == "float32"


def test_launcher_defaults_are_sized_and_validated(tmp_path, demo_model_dir) -> None:
    assert EngineConfig().max_loras == 0 and EngineConfig().max_cpu_loras == 0  # sized unless set
    args = build_parser().parse_args(["--adapter-memory-fraction", "0.05", "--max-cpu-loras", "32"])
    assert args.adapter_memory_fraction == 0.05 and args.max_cpu_loras == 32
    config, plan = sized(EngineConfig(model=str(demo_model_dir), adapter_store=str(tmp_path), max_num_seqs=8))
    assert config.max_loras == plan.max_loras >= 1 and config.max_cpu_loras == plan.max_cpu_loras >= config.max_loras
    argv = config.vllm_argv()
    assert argv[argv.index("--max-loras") + 1] == str(config.max_loras)
    for bad in (dict(adapter_memory_fraction=0.0), dict(adapter_cache_fraction=1.5), dict(max_loras=-1)):
        with pytest.raises(ValueError):
            EngineConfig(model=str(demo_model_dir), **bad).validate()


def test_a_model_the_sizing_cannot_read_needs_explicit_counts(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="set --max-loras and --max-cpu-loras"):
        sized(EngineConfig(model=str(tmp_path), adapter_store=str(tmp_path / "s")))
    config, plan = sized(EngineConfig(model=str(tmp_path), adapter_store=str(tmp_path / "s"), max_loras=2,
                                      max_cpu_loras=4))
    assert plan is None and (config.max_loras, config.max_cpu_loras) == (2, 4)
