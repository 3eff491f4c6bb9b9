"""The transformers oracle on the real demo model (SmolLM2-135M-Instruct, fp32)."""

from __future__ import annotations

import pytest
import torch

from flylora_runtime.weights.dense import FlyLoRAAdapter
from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter
from flylora_runtime.reference.hf_oracle import attach_flylora
from flylora_runtime.format.modelspec import BaseModelSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    return tok, model, BaseModelSpec.from_pretrained(demo_model_dir)


def _chat_ids(tok, text: str):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)


def test_top_k_equal_r_zero_bias_matches_peft_lora(demo, tmp_path):
    from peft import PeftModel

    tok, model, base = demo
    plain = generate_adapter(base, GenerateSpec(r=16, top_k=None, lora_alpha=32, b_std=0.05, seed=7),
                             base_name="SmolLM2-135M-Instruct")
    plain.save(tmp_path / "plain")
    loaded = FlyLoRAAdapter.load(tmp_path / "plain", base)
    assert loaded.config.top_k == 16 and not loaded.config.is_flylora
    ids = _chat_ids(tok, "Name three colours.")

    fly = attach_flylora(model, {"plain": loaded})
    try:
        with torch.no_grad(), fly.rows(["plain"]):
            ours = model(**ids).logits
        with torch.no_grad():
            base_logits = model(**ids).logits
    finally:
        fly.detach()
    peft_model = PeftModel.from_pretrained(model, tmp_path / "plain")
    try:
        with torch.no_grad():
            theirs = peft_model(**ids).logits
    finally:
        peft_model.unload()
    assert (ours - base_logits).abs().max() > 1e-2, "the adapter must change the logits for the check to mean anything"
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_per_row_batching_equals_one_adapter_at_a_time(demo):
    tok, model, base = demo
    adapters = {
        "a": generate_adapter(base, GenerateSpec(d_std=0.02, seed=1)),
        "b": generate_adapter(base, GenerateSpec(r=16, top_k=4, d_std=0.02, seed=2, routing="magnitude")),
    }
    ids = _chat_ids(tok, "Tell me a fact about owls.")
    rows = ["a", None, "b", "a"]
    batch = {k: v.repeat(len(rows), 1) for k, v in ids.items()}
    fly = attach_flylora(model, adapters)
    try:
        with torch.no_grad(), fly.rows(rows):
            batched = model(**batch).logits
        # One adapter at a time, on a batch of the same shape: the base matmuls then take the same BLAS path
        # (a 1-row batch differs from a 4-row one by ~1e-4 in the base model alone, adapters or not).
        singles = []
        for i, name in enumerate(rows):
            with torch.no_grad(), fly.rows([name] * len(rows)):
                singles.append(model(**batch).logits[i])
    finally:
        fly.detach()
    for i, name in enumerate(rows):
        torch.testing.assert_close(batched[i], singles[i], rtol=1e-5, atol=1e-5, msg=f"row {i} ({name})")
    assert (singles[0] - singles[1]).abs().max() > 1e-2
    assert (singles[0] - singles[2]).abs().max() > 1e-2


def test_demo_model_with_and_without_adapter_gives_coherent_different_text(demo):
    tok, model, base = demo
    adapter = generate_adapter(base, GenerateSpec(d_std=0.01, seed=1))
    ids = _chat_ids(tok, "Write one sentence about the sea.")
    fly = attach_flylora(model, {"demo": adapter})
    texts = {}
    try:
        for name in (None, "demo"):
            with torch.no_grad(), fly.rows([name]):
                out = model.generate(**ids, max_new_tokens=24, do_sample=False)
            texts[name] = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        fly.detach()
    assert texts[None] != texts["demo"]
    for text in texts.values():
        words = text.split()
        assert len(words) >= 10, text
        assert "sea" in text.lower(), text  # still on topic
        assert len(set(words)) >= 0.6 * len(words), f"degenerate repetition: {text!r}"
