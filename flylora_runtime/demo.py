"""The demo model and adapters, and a quick look at them without the service.

``--prepare`` (what ``make serve`` calls) obtains the demo model and the demo adapters and prints them as
JSON. Without it, this runs the transformers oracle (:mod:`flylora_runtime.hf`) on CPU: the demo model
answering greedily with and without the demo adapter, no engine or gateway needed.

The demo adapter is a random FlyLoRA adapter in the authors' format (r=32, top_k=8, alpha=64, all seven
projections, nonzero routing bias; cached in the data folder).

    python -m flylora_runtime.demo [--prompt TEXT] [--max-new-tokens N] [--prepare]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .checkpoint import CONFIG_NAME
from .demo_model import DemoModelUnavailable, ensure_demo_model
from .paths import data_dir

DEMO_ADAPTER = "flylora-demo"


def ensure_demo_adapter(model_dir) -> "object":
    from .generate import GenerateSpec, generate_adapter
    from .modelspec import BaseModelSpec

    path = data_dir() / "demo-adapters" / DEMO_ADAPTER
    if not (path / CONFIG_NAME).is_file():
        base = BaseModelSpec.from_pretrained(model_dir)
        generate_adapter(base, GenerateSpec(d_std=0.01, seed=1), base_name="SmolLM2-135M-Instruct").save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flylora-demo", description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="Write one sentence about the sea.")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--prepare", action="store_true",
                   help="only obtain the demo model and adapters; print [{name, path}] as JSON (used by make serve)")
    args = p.parse_args(argv)
    try:
        model_dir = ensure_demo_model()
    except DemoModelUnavailable as exc:
        print(f"flylora-demo: error: {exc}", file=sys.stderr)
        return 1

    if args.prepare:
        print(json.dumps([{"name": DEMO_ADAPTER, "path": str(ensure_demo_adapter(model_dir))}]))
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapter import FlyLoRAAdapter
    from .hf import attach_flylora
    from .modelspec import BaseModelSpec

    adapter_dir = ensure_demo_adapter(model_dir)
    adapter = FlyLoRAAdapter.load(adapter_dir, BaseModelSpec.from_pretrained(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fly = attach_flylora(model, {DEMO_ADAPTER: adapter})
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    c = adapter.config
    print(f"base model : {model_dir}")
    print(f"adapter    : {adapter_dir} (r={c.r}, top_k={c.top_k}, alpha={c.lora_alpha:g}, "
          f"{len(adapter.modules)} modules, routing={c.routing})")
    print(f"prompt     : {args.prompt}")
    for name in (None, DEMO_ADAPTER):
        t0 = time.perf_counter()
        with torch.no_grad(), fly.rows([name]):
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        new = out[0, ids["input_ids"].shape[1]:]
        text = tok.decode(new, skip_special_tokens=True).strip()
        dt = time.perf_counter() - t0
        print(f"\n[{name or 'base model'}] ({len(new)} tokens, {dt:.1f} s)\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
