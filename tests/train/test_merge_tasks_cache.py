"""The merge tool (authors' element-wise mean), the demo tasks' data and scorers, and the adapter cache key."""

from __future__ import annotations

import json

import pytest
import torch

from flylora_runtime.weights.dense import FlyLoRAAdapter, ModuleWeights
from flylora_runtime.format.config import FlyLoRAConfig
from flylora_runtime.training.merge import merge_adapters
from flylora_runtime.demo.tasks import TASKS, get_task
from flylora_runtime.demo import trained as cache


def _adapter(seed: int, *, r=4, top_k=2, modules=("model.layers.0.self_attn.q_proj",)) -> FlyLoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    cfg = FlyLoRAConfig.from_dict({"r": r, "top_k": top_k, "lora_alpha": 8 + seed, "target_modules": ["q_proj"],
                                   "bias_u": 0.001})
    return FlyLoRAAdapter(cfg, {m: ModuleWeights(A=torch.randn(r, 6, generator=g), B=torch.randn(5, r, generator=g),
                                                 d=torch.randn(r, generator=g)) for m in modules})


def test_merge_is_the_elementwise_mean_of_A_B_and_d_with_the_first_config():
    ads = [_adapter(s) for s in (1, 2, 3)]
    merged = merge_adapters(ads)
    m = "model.layers.0.self_attn.q_proj"
    for t in ("A", "B", "d"):
        torch.testing.assert_close(getattr(merged.modules[m], t), sum(getattr(a.modules[m], t) for a in ads) / 3)
    assert merged.config == ads[0].config and merged.config.lora_alpha == 9


def test_merge_refuses_mismatched_adapters():
    with pytest.raises(ValueError, match="at least two"):
        merge_adapters([_adapter(1)])
    with pytest.raises(ValueError, match="r=8"):
        merge_adapters([_adapter(1), _adapter(2, r=8)])
    with pytest.raises(ValueError, match="different modules"):
        merge_adapters([_adapter(1), _adapter(2, modules=("model.layers.1.self_attn.q_proj",))])


@pytest.mark.parametrize("name", list(TASKS))
def test_tasks_are_deterministic_disjoint_and_scored_by_their_reference(name):
    task = get_task(name)
    train, held = task.train(), task.heldout()
    assert train == task.train() and held == task.heldout() and len(train) >= 100 and len(held) >= 50
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert all(task.score(e, e.answer) for e in held)
    assert not any(task.score(e, "I'm sorry, I can't help with that.") for e in held)
    assert not any(task.score(e, e.prompt) for e in held)  # echoing the question is not an answer


def test_scorers_reject_near_misses():
    js = get_task("json-reply").heldout()[0]
    obj = json.loads(js.target)
    assert get_task("json-reply").score(js, " " + js.target + "\n")
    assert not get_task("json-reply").score(js, json.dumps({**obj, "age": obj["age"] + 1}))
    assert not get_task("json-reply").score(js, "Here it is: " + js.target)
    at = get_task("atlas").heldout()[0]
    assert get_task("atlas").score(at, f"It is {at.target}.")
    assert not get_task("atlas").score(at, "It is Kelmport or Ulmiradi or Fosshaven.")
    sh = get_task("shout").heldout()[0]
    assert not get_task("shout").score(sh, sh.target.lower())


def test_cache_hits_only_on_a_matching_key(tmp_path, monkeypatch):
    folder = tmp_path / "atlas"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    assert cache.cached("atlas", tmp_path) is None                      # no key
    key = cache.cache_key("atlas", cache.train_config("atlas"))
    (folder / cache.KEY_NAME).write_text(json.dumps(key))
    assert cache.cached("atlas", tmp_path) == folder
    monkeypatch.setitem(cache.DEMO_TRAIN_PER_TASK, "atlas", {"steps": 7})  # other hyperparameters: a miss
    assert cache.cached("atlas", tmp_path) is None
    monkeypatch.delitem(cache.DEMO_TRAIN_PER_TASK, "atlas")
    monkeypatch.setattr(cache, "code_version", lambda: "other code")      # other code: a miss
    assert cache.cached("atlas", tmp_path) is None
    assert key["data"] == get_task("atlas").data_hash() != get_task("shout").data_hash()
