"""The engine's vLLM command line (no engine started)."""

from __future__ import annotations

from flylora_runtime.engine.launcher import EngineConfig
from flylora_runtime.format.modelspec import PARENT


def test_vllm_wraps_only_the_projections_adapters_may_target(tmp_path) -> None:
    """Without ``--lora-target-modules`` vLLM also wraps lm_head and embed_tokens and runs a LoRA pass over
    the vocabulary every step; adapters can only target the seven projections the validator accepts."""
    argv = EngineConfig(model=str(tmp_path), adapter_store=str(tmp_path / "store")).vllm_argv()
    i = argv.index("--lora-target-modules")
    targets = []
    for arg in argv[i + 1:]:
        if arg.startswith("--"):
            break
        targets.append(arg)
    assert sorted(targets) == sorted(PARENT) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert "lm_head" not in argv and "embed_tokens" not in argv
