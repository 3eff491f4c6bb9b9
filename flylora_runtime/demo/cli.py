"""The demo model and adapters, and a quick look at them without the service.

``--prepare`` (what ``make serve`` calls) obtains the demo model and the demo adapters and prints them as
JSON. Without it, this runs the transformers oracle (:mod:`flylora_runtime.reference.hf_oracle`) on CPU: the demo model
answering greedily with and without each demo adapter, no engine or gateway needed.

The demo adapters are FlyLoRA adapters trained on the three demo tasks (:mod:`flylora_runtime.demo.tasks`:
``shout``, ``json-reply``, ``atlas``) with the paper's configuration (r=32, top_k=8, alpha=64, all seven
projections), plus ``merged``, their element-wise mean (the authors' merging). They are trained on first use
(a few CPU minutes each) and cached in the data folder, keyed by data, hyperparameters and code.

    python -m flylora_runtime.demo.cli [--prompt TEXT] [--max-new-tokens N] [--prepare]

Without ``--prompt`` each adapter gets a held-out prompt of its own task.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flylora_runtime.demo.model import DemoModelUnavailable, ensure_demo_model
from flylora_runtime.paths import data_dir

#: The order make serve uploads them in; the first one is used in the printed examples.
DEMO_TASK_ORDER = ("shout", "json-reply", "atlas")
MERGED_ADAPTER = "merged"


def ensure_trained_adapters(model_dir) -> dict[str, Path]:
    """name -> folder of the trained demo adapters (trained now unless cached) and their merge."""
    from flylora_runtime.weights.dense import FlyLoRAAdapter
    from flylora_runtime.training.merge import merge_adapters
    from flylora_runtime.format.modelspec import BaseModelSpec
    from flylora_runtime.demo.trained import ensure_trained

    out = {t: ensure_trained(t, model_dir=model_dir) for t in DEMO_TASK_ORDER}
    merged = data_dir() / "demo-adapters" / MERGED_ADAPTER
    spec = BaseModelSpec.from_pretrained(model_dir)
    merge_adapters([FlyLoRAAdapter.load(out[t], spec) for t in DEMO_TASK_ORDER]).save(merged)
    out[MERGED_ADAPTER] = merged
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flylora-demo", description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default=None, help="one prompt for every adapter (default: one of each task's)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--prepare", action="store_true",
                   help="only obtain the demo model and adapters; print [{name, path}] as JSON (used by make serve)")
    args = p.parse_args(argv)
    try:
        model_dir = ensure_demo_model()
    except DemoModelUnavailable as exc:
        print(f"flylora-demo: error: {exc}", file=sys.stderr)
        return 1

    paths = ensure_trained_adapters(model_dir)
    if args.prepare:
        print(json.dumps([{"name": n, "path": str(p)} for n, p in paths.items()]))
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flylora_runtime.weights.dense import FlyLoRAAdapter
    from flylora_runtime.reference.hf_oracle import attach_flylora
    from flylora_runtime.format.modelspec import BaseModelSpec
    from flylora_runtime.demo.tasks import get_task

    spec = BaseModelSpec.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fly = attach_flylora(model, {n: FlyLoRAAdapter.load(p, spec) for n, p in paths.items()})
    print(f"base model : {model_dir}")
    for name in DEMO_TASK_ORDER:
        prompt = args.prompt or get_task(name).heldout()[0].prompt
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        print(f"\nprompt: {prompt}")
        for row in (None, name):
            t0 = time.perf_counter()
            with torch.no_grad(), fly.rows([row]):
                out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            print(f"  [{row or 'base model'}] ({time.perf_counter() - t0:.1f} s) {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
