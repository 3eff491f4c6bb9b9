"""Helpers for engine tests: the transformers oracle and plain HTTP calls to the engine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import httpx
import torch

from flylora_runtime.weights.dense import FlyLoRAAdapter
from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter
from flylora_runtime.reference.hf_oracle import attach_flylora
from flylora_runtime.format.modelspec import BaseModelSpec

PROMPTS = [
    "Write one sentence about the sea.",
    "Name three colours.",
    "What is 12 plus 7?",
    "Give me a tip for learning to cook.",
    "Describe a cat in five words.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
    "Translate 'good morning' into French.",
]


class Oracle:
    """The demo model in fp32 with FlyLoRA adapters attached through the pure-torch reference."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.base = BaseModelSpec.from_pretrained(model_dir)
        self.eos = self.tok.eos_token_id

    def chat_ids(self, text: str) -> list[int]:
        return self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]

    def generate(self, ids: list[int], rows: Sequence[str | None], adapters: dict[str, FlyLoRAAdapter],
                 max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of one prompt, one per row (row = adapter name or None), cut after EOS."""
        fly = attach_flylora(self.model, adapters)
        try:
            batch = torch.tensor([ids] * len(rows))
            with torch.no_grad(), fly.rows(list(rows)):
                out = self.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch),
                                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.eos)
        finally:
            fly.detach()
        return [cut_at_eos(seq[len(ids):].tolist(), self.eos) for seq in out]


def cut_at_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def make_adapter(base: BaseModelSpec, store: Path, name: str, **spec) -> FlyLoRAAdapter:
    adapter = generate_adapter(base, GenerateSpec(**spec), base_name="SmolLM2-135M-Instruct")
    adapter.save(store / name)
    return adapter


def complete(url: str, model: str, ids: list[int], max_tokens: int, *, logprobs: bool = False,
             timeout: float = 600) -> dict:
    """One greedy /v1/completions call with a token-id prompt; returns token ids (and logprobs)."""
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    if logprobs:
        body["logprobs"] = 1
    r = httpx.post(url + "/v1/completions", json=body, timeout=timeout)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    out = {"tokens": list(choice["token_ids"])}
    if logprobs:
        out["logprobs"] = choice["logprobs"]["token_logprobs"]
    return out


def complete_many(url: str, calls: list[tuple[str, list[int]]], max_tokens: int, *, workers: int = 64,
                  logprobs: bool = False) -> list[dict]:
    """Send all calls at once (the engine batches them together); results in call order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(complete, url, m, ids, max_tokens, logprobs=logprobs) for m, ids in calls]
        return [f.result() for f in futures]


def unload(url: str, name: str) -> int:
    return httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60).status_code
