"""bf16 engine vs the fp32 oracle: token agreement, and the margins at the tokens that disagree.

Starts a bf16 engine with the FlyLoRA plugin, asks it for greedy continuations of 8 prompts with three
FlyLoRA adapters (r=32, k=8, nonzero d) and the base model, all in one concurrent batch, then scores every
generated token with the fp32 transformers oracle *teacher-forced on the engine's own prefix*:

- agreement: the share of positions where the oracle's argmax is the engine's token;
- margin: ``logit[oracle argmax] - logit[engine token]`` under the oracle (0 where they agree).

If the FlyLoRA path is right, bf16 disagreements happen only where the oracle's top two candidates are
nearly tied (small margins), exactly as for the base model, whose bf16 rows get the same treatment.

    python -m flylora_runtime.bench.agreement [--json PATH] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from flylora_runtime.weights.dense import FlyLoRAAdapter
from flylora_runtime.engine.launcher import EngineConfig
from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter
from flylora_runtime.reference.hf_oracle import attach_flylora
from flylora_runtime.format.modelspec import BaseModelSpec
from flylora_runtime.paths import DEMO_MODEL_NAME, demo_model_dir
from flylora_runtime.engine.process import EngineProcess, free_port

PROMPTS = [
    "Write one sentence about the sea.", "Name three colours.", "What is 12 plus 7?",
    "Give me a tip for learning to cook.", "Describe a cat in five words.", "Why is the sky blue?",
    "Suggest a name for a small bakery.", "Translate 'good morning' into French.",
]


def _complete(url: str, model: str, ids: list[int], max_tokens: int) -> list[int]:
    r = httpx.post(url + "/v1/completions", timeout=600, json={
        "model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True})
    r.raise_for_status()
    return list(r.json()["choices"][0]["token_ids"])


def teacher_forced_margins(model, fly, row: str | None, prompt: list[int], generated: list[int]) -> list[float]:
    """Oracle margin at each generated position given the engine's prefix (0.0 where it agrees)."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad(), fly.rows([row]):
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) - 1 + len(generated)]
    chosen = logits.gather(1, torch.tensor(generated).unsqueeze(1)).squeeze(1)
    return (logits.max(dim=1).values - chosen).tolist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flylora_runtime.bench.agreement", description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = demo_model_dir()
    base = BaseModelSpec.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        adapters: dict[str, FlyLoRAAdapter] = {}
        for i, routing in enumerate(("signed", "signed", "magnitude")):
            name = f"fl-agree-{i}"
            adapters[name] = generate_adapter(base, GenerateSpec(r=32, top_k=8, lora_alpha=64, d_std=0.05, b_std=0.03,
                                                                 seed=11 + i, routing=routing), base_name=DEMO_MODEL_NAME)
            adapters[name].save(store / name)
        rows: list[str | None] = [*adapters, None]
        prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                           return_dict=True)["input_ids"] for t in PROMPTS]
        calls = [(row, ids) for ids in prompts for row in rows]
        config = EngineConfig(model=str(model_dir), adapter_store=str(store), port=free_port(), dtype="bfloat16")
        print("[agreement] starting a bf16 engine ...", file=sys.stderr, flush=True)
        with EngineProcess(config, Path(tmp) / "engine.log") as engine:
            with ThreadPoolExecutor(len(calls)) as pool:
                outs = list(pool.map(lambda c: _complete(engine.url, c[0] or DEMO_MODEL_NAME, c[1], args.max_tokens),
                                     calls))
    fly = attach_flylora(model, adapters)
    per_kind: dict[str, list[float]] = {"flylora": [], "base": []}
    for (row, ids), gen in zip(calls, outs):
        per_kind["base" if row is None else "flylora"] += teacher_forced_margins(model, fly, row, ids, gen)
    fly.detach()

    report = {"engine_dtype": "bfloat16", "oracle_dtype": "float32", "prompts": len(PROMPTS), "adapters": 3,
              "max_tokens": args.max_tokens}
    print(f"{'rows':<8} {'tokens':>7} {'agree':>8} {'disagree':>9} {'max margin':>11} {'median margin':>14}")
    for kind, margins in per_kind.items():
        bad = [m for m in margins if m > 0]
        row = {"tokens": len(margins), "agreement": 1 - len(bad) / max(1, len(margins)), "disagreements": len(bad),
               "max_margin": max(bad, default=0.0), "median_margin": statistics.median(bad) if bad else 0.0,
               "margins": sorted(bad)}
        report[kind] = row
        print(f"{kind:<8} {row['tokens']:>7} {row['agreement']:>8.4f} {row['disagreements']:>9} "
              f"{row['max_margin']:>11.4f} {row['median_margin']:>14.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
