"""The FlyLoRA trainer: its layer against the reference, the bias rule, a short real training run on a tiny
Llama, the checkpoint it writes, and the prompt masking."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flylora_runtime.weights.dense import FlyLoRAAdapter
from flylora_runtime.training.random_adapters import sparse_A
from flylora_runtime.reference.hf_oracle import attach_flylora
from flylora_runtime.format.modelspec import BaseModelSpec
from flylora_runtime.reference.ops import LayerAdapter, flylora_delta_one, select_ranks
from flylora_runtime.demo.tasks import get_task
from flylora_runtime.training.trainer import FlyLoRATrainLinear, TrainConfig, collate, encode, reply_loss, train


def _layer(routing: str, *, n_in=48, n_out=40, r=16, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(n_in, n_out)
    layer = FlyLoRATrainLinear(base, sparse_A(r, k, n_in, gen), top_k=k, scaling=2.0, bias_u=0.01, routing=routing)
    with torch.no_grad():
        layer.B.copy_(torch.randn(n_out, r, generator=gen))
        layer.d.copy_(torch.randn(r, generator=gen) * 0.05)
    return layer


@pytest.mark.parametrize("routing", ["signed", "magnitude"])
@pytest.mark.parametrize("tokens", [1, 7, 133])
def test_train_layer_forward_equals_reference(routing, tokens):
    layer = _layer(routing)
    x = torch.randn(tokens, 48, generator=torch.Generator().manual_seed(1))
    d0 = layer.d.clone()
    ref = layer.base(x) + flylora_delta_one(x, LayerAdapter(A=layer.A, B=layer.B.detach(), d=d0, top_k=4,
                                                             scaling=2.0, routing=routing))
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["signed", "magnitude"])
def test_bias_update_follows_the_authors_rule(routing):
    layer = _layer(routing)
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))  # [batch, seq, in]: counts over all tokens
    d0 = layer.d.clone()
    mask = select_ranks((x.reshape(-1, 48) @ layer.A.T), d0, 4, routing)
    c = mask.sum(0).float()
    layer(x)
    torch.testing.assert_close(layer.d, d0 + 0.01 * torch.sign(c.mean() - c))
    assert not torch.equal(layer.d, d0)
    layer.update_bias = False
    d1 = layer.d.clone()
    layer(x)
    assert torch.equal(layer.d, d1)


def test_only_B_gets_gradients():
    layer = _layer("signed")
    layer.base.requires_grad_(False)
    layer(torch.randn(3, 48)).sum().backward()
    assert layer.B.grad is not None and layer.B.grad.abs().sum() > 0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["B"]
    assert not layer.A.requires_grad and not layer.d.requires_grad


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture()
def tiny(tokenizer, tmp_path):
    """A 2-layer Llama with the demo model's vocabulary and chat template; its config.json in tmp_path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2)
    model = LlamaForCausalLM(cfg).eval()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    return model, BaseModelSpec.from_pretrained(tmp_path)


def test_encode_labels_only_the_reply_and_its_end_token(tokenizer):
    ex = get_task("shout").train()[0]
    ids, labels = encode(tokenizer, ex.chat()["messages"], 256)
    n_prompt = labels.count(-100)
    assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
    assert tokenizer.decode(ids[n_prompt:]) == ex.answer + "<|im_end|>"
    prompt = tokenizer.decode(ids[:n_prompt])
    assert prompt.endswith("<|im_start|>assistant\n") and ex.prompt in prompt


def test_reply_loss_equals_the_models_loss(tiny, tokenizer):
    model, _ = tiny
    batch = collate([encode(tokenizer, e.chat()["messages"], 256) for e in get_task("atlas").train()[:3]], 0)
    torch.testing.assert_close(reply_loss(model, batch), model(**batch).loss)


def test_short_training_run_learns_updates_d_and_saves_the_authors_format(tiny, tokenizer, tmp_path):
    model, spec = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(r=8, top_k=2, lora_alpha=16, steps=12, batch_size=4, lr=5e-2, warmup=1, bias_u=1e-3)
    examples = [e.chat() for e in get_task("shout").train()[:8]]
    res = train(model, tokenizer, examples, cfg, base_name="tiny", progress=False)

    assert len(res.losses) == 12 and sum(res.losses[-3:]) / 3 < 0.8 * sum(res.losses[:3]) / 3
    for k, v in model.state_dict().items():  # the base model is restored, untouched
        assert torch.equal(v, before[k]), k
    ad = res.adapter
    assert len(ad.modules) == 2 * 7
    for w in ad.modules.values():
        assert w.B.abs().sum() > 0                       # trained from zero
        assert w.d.abs().sum() > 0                       # moved by the bias rule ...
        steps_of_u = w.d / 1e-3                          # ... in whole steps of bias_u (one per forward call)
        torch.testing.assert_close(steps_of_u, steps_of_u.round(), rtol=0, atol=1e-3)
        assert ((w.A != 0).sum(1) == w.A.shape[1] // (8 // 2)).all()   # the authors' sparse A

    ad.save(tmp_path / "ad")
    cfg_json = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg_json["top_k"] == 2 and cfg_json["bias_u"] == 1e-3 and cfg_json["init_lora_weights"] == "sparse"
    assert cfg_json["r"] == 8 and cfg_json["lora_alpha"] == 16 and len(cfg_json["target_modules"]) == 7
    loaded = FlyLoRAAdapter.load(tmp_path / "ad", spec)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.1.mlp.down_proj.lora_topk_bias" in set(f.keys())
    for m, w in ad.modules.items():
        assert torch.equal(loaded.modules[m].d, w.d) and torch.equal(loaded.modules[m].B, w.B)

    # the saved adapter, served by the transformers oracle, lowered the loss it was trained on
    batch = collate([encode(tokenizer, e["messages"], 256) for e in examples], 0)
    with torch.no_grad():
        base_loss = float(reply_loss(model, batch))
        fly = attach_flylora(model, {"a": loaded})
        with fly.rows(["a"] * len(examples)):
            adapted_loss = float(reply_loss(model, batch))
        fly.detach()
    assert adapted_loss < 0.8 * base_loss


def test_shared_prefix_gives_the_same_loss_gradients_and_bias_update(tiny, tokenizer):
    from flylora_runtime.training.trainer import attach_trainable, common_prefix_len

    model, _ = tiny
    encoded = [encode(tokenizer, e.chat()["messages"], 256) for e in get_task("json-reply").train()[:4]]
    prefix = common_prefix_len(encoded)
    assert prefix > 10  # the template's system prompt
    batch = collate(encoded, 0)
    layers = attach_trainable(model, TrainConfig(r=8, top_k=2, bias_u=0.01), torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for lay in layers.values():
        with torch.no_grad():
            lay.B.copy_(torch.randn(lay.B.shape, generator=gen) * 0.05)
            lay.d.copy_(torch.randn(lay.d.shape, generator=gen) * 0.01)
    d0 = {k: lay.d.clone() for k, lay in layers.items()}
    results = []
    for p in (0, prefix):
        for k, lay in layers.items():
            lay.d.copy_(d0[k])
            lay.B.grad = None
        loss = reply_loss(model, batch, layers, p)
        loss.backward()
        results.append((loss.detach(), {k: lay.B.grad.clone() for k, lay in layers.items()},
                        {k: lay.d.clone() for k, lay in layers.items()}))
    (l0, g0, d_full), (l1, g1, d_shared) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for k in layers:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)
        assert torch.equal(d_shared[k], d_full[k]), k          # one update per step, same counts
        assert not torch.equal(d_full[k], d0[k])
