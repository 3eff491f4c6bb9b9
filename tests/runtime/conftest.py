"""Shared fixtures for runtime tests: a tiny Llama-shaped base spec and generated adapters."""

from __future__ import annotations

import pytest

from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter
from flylora_runtime.format.modelspec import BaseModelSpec

TINY_CONFIG = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 2,
}


@pytest.fixture
def tiny_base() -> BaseModelSpec:
    """A 2-layer Llama-shaped spec (hidden 64, intermediate 96, 4 heads / 2 KV heads)."""
    return BaseModelSpec.from_hf_config(TINY_CONFIG, name="tiny-llama")


@pytest.fixture
def tiny_adapter_dir(tmp_path, tiny_base):
    """A FlyLoRA adapter (r=8, k=2, nonzero d) saved in the authors' format; returns its directory."""
    adapter = generate_adapter(tiny_base, GenerateSpec(r=8, top_k=2, lora_alpha=16, d_std=0.05, seed=3))
    path = tmp_path / "adapter"
    adapter.save(path)
    return path
