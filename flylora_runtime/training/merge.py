"""Merge FlyLoRA adapters the authors' way: element-wise mean of every tensor (A, B and d).

The merged adapter keeps the first adapter's config and is served as an ordinary FlyLoRA adapter. All
inputs must have the same rank, top_k and modules (the shapes must match for a mean to mean anything).
Note that the mean of the A's is no longer the sparse A any one adapter was trained with: that is the
authors' procedure, whose claim is that random sparse A's of different tasks are nearly orthogonal.

    python -m flylora_runtime.training.merge OUT IN1 IN2 [IN3 ...] [--base MODEL_DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from flylora_runtime.weights.dense import FlyLoRAAdapter, ModuleWeights
from flylora_runtime.format.errors import AdapterError


def merge_adapters(adapters: Sequence[FlyLoRAAdapter]) -> FlyLoRAAdapter:
    """Element-wise mean of A, B and d over ``adapters``, with ``adapters[0]``'s config.

    Semantics, for every module ``m``::

        A[m] = mean_i adapters[i].A[m];  B[m] = mean_i adapters[i].B[m];  d[m] = mean_i adapters[i].d[m]

    Raises ``ValueError`` when fewer than two adapters are given or their modules, ranks or shapes differ.
    """
    if len(adapters) < 2:
        raise ValueError(f"need at least two adapters to merge, got {len(adapters)}")
    first = adapters[0]
    for i, a in enumerate(adapters[1:], 1):
        if set(a.modules) != set(first.modules):
            raise ValueError(f"adapter {i} adapts different modules than adapter 0")
        if (a.config.r, a.config.top_k) != (first.config.r, first.config.top_k):
            raise ValueError(f"adapter {i} has r={a.config.r}, top_k={a.config.top_k}; adapter 0 has "
                             f"r={first.config.r}, top_k={first.config.top_k}")
    modules = {}
    for m in first.modules:
        parts = [a.modules[m] for a in adapters]
        for t in ("A", "B", "d"):
            shapes = {tuple(getattr(p, t).shape) for p in parts}
            if len(shapes) != 1:
                raise ValueError(f"{m}: {t} shapes differ between adapters: {sorted(shapes)}")
        modules[m] = ModuleWeights(
            A=torch.stack([p.A.float() for p in parts]).mean(0),
            B=torch.stack([p.B.float() for p in parts]).mean(0),
            d=torch.stack([p.d.float() for p in parts]).mean(0),
        )
    return FlyLoRAAdapter(config=first.config, modules=modules)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flylora-merge", description=__doc__.splitlines()[0])
    p.add_argument("out", help="output adapter directory")
    p.add_argument("inputs", nargs="+", help="adapter directories (two or more; the first one's config is kept)")
    p.add_argument("--base", default=None, help="base model directory to validate against (default: the demo model)")
    args = p.parse_args(argv)
    from flylora_runtime.format.modelspec import BaseModelSpec
    from flylora_runtime.paths import demo_model_dir

    try:
        base = BaseModelSpec.from_pretrained(args.base or demo_model_dir())
        merged = merge_adapters([FlyLoRAAdapter.load(d, base) for d in args.inputs])
    except (ValueError, OSError, AdapterError) as exc:
        print(f"flylora-merge: error: {exc}", file=sys.stderr)
        return 2
    merged.save(args.out)
    print(f"merged {len(args.inputs)} adapters ({len(merged.modules)} modules) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
