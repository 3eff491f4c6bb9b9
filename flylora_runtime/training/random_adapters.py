"""Write a random FlyLoRA adapter in the authors' format, for tests, demos and benchmarks.

A is made as the authors' ``init_lora_weights = "sparse"`` does (each row: ``p = in // (r // top_k)``
nonzeros at random columns, values from ``Normal(0, (1/r)^2)``); B and d are drawn at chosen scales.
Everything comes from one ``torch.Generator`` seeded by ``--seed``: same arguments, same bytes.

    python -m flylora_runtime.training.random_adapters --base .work/models/SmolLM2-135M-Instruct --out /tmp/ad --seed 1
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from flylora_runtime.weights.dense import FlyLoRAAdapter, ModuleWeights
from flylora_runtime.format.checkpoint import expected_modules
from flylora_runtime.format.config import KNOWN_PROJECTIONS, ROUTINGS, FlyLoRAConfig
from flylora_runtime.format.modelspec import BaseModelSpec

ALL_TARGETS = KNOWN_PROJECTIONS


@dataclass(frozen=True)
class GenerateSpec:
    """What to generate.

    Attributes:
        r: rank. top_k: ranks per token (``None``: a plain PEFT LoRA checkpoint, dense A, no bias).
        lora_alpha: scaling numerator. targets: projection names.
        b_std: std of B's entries. d_std: std of the routing bias d (0: zeros).
        routing: "signed" or "magnitude". seed: the generator's seed.
    """

    r: int = 32
    top_k: int | None = 8
    lora_alpha: float = 64.0
    targets: tuple[str, ...] = ALL_TARGETS
    b_std: float = 0.02
    d_std: float = 0.0
    routing: str = "signed"
    seed: int = 0
    bias_u: float = 0.001

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if self.top_k is not None and not 0 < self.top_k <= self.r:
            raise ValueError(f"top_k must satisfy 0 < top_k <= r = {self.r}, got {self.top_k}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.b_std < 0 or self.d_std < 0:
            raise ValueError(f"b_std and d_std must be >= 0, got {self.b_std}, {self.d_std}")


def sparse_A(r: int, top_k: int, n_in: int, gen: torch.Generator) -> torch.Tensor:
    """The authors' sparse init: ``in // (r // top_k)`` nonzeros per row at uniformly random columns
    (a random permutation's first ``p`` entries, as their per-row ``randperm``), ``Normal(0, 1/r^2)`` values."""
    p = n_in // (r // top_k)
    cols = torch.rand(r, n_in, generator=gen).argsort(dim=1)[:, :p]
    A = torch.zeros(r, n_in)
    A.scatter_(1, cols, torch.randn(r, p, generator=gen) / r)
    return A


def generate_adapter(base: BaseModelSpec, spec: GenerateSpec, base_name: str | None = None) -> FlyLoRAAdapter:
    raw = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name or base.name,
        "r": spec.r, "lora_alpha": spec.lora_alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(spec.targets), "inference_mode": True,
    }
    if spec.top_k is not None:
        raw.update({"top_k": spec.top_k, "bias_u": spec.bias_u, "init_lora_weights": "sparse"})
        if spec.routing != "signed":
            raw["flylora_routing"] = spec.routing
    config = FlyLoRAConfig.from_dict(raw)
    gen = torch.Generator().manual_seed(spec.seed)
    modules = {}
    for m in expected_modules(config, base):
        n_in, n_out = base.shape_of(m)
        if spec.top_k is None:
            A = torch.randn(spec.r, n_in, generator=gen) / spec.r
        else:
            A = sparse_A(spec.r, spec.top_k, n_in, gen)
        B = torch.randn(n_out, spec.r, generator=gen) * spec.b_std
        d = torch.randn(spec.r, generator=gen) * spec.d_std if spec.d_std else torch.zeros(spec.r)
        modules[m] = ModuleWeights(A=A, B=B, d=d)
    return FlyLoRAAdapter(config=config, modules=modules)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flylora-random-adapters", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="base model directory (with config.json)")
    p.add_argument("--out", required=True, help="output directory (PEFT layout)")
    p.add_argument("--r", type=int, default=32, help="rank (default 32)")
    p.add_argument("--top-k", type=int, default=8, help="ranks per token (default 8)")
    p.add_argument("--plain-lora", action="store_true", help="write a plain PEFT LoRA checkpoint (no top_k, no d)")
    p.add_argument("--alpha", type=float, default=64.0, help="lora_alpha (default 64)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated projection names")
    p.add_argument("--b-std", type=float, default=0.02, help="std of B (default 0.02)")
    p.add_argument("--d-std", type=float, default=0.0, help="std of the routing bias d (default 0)")
    p.add_argument("--routing", choices=ROUTINGS, default="signed")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = GenerateSpec(
            r=args.r, top_k=None if args.plain_lora else args.top_k, lora_alpha=args.alpha,
            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), b_std=args.b_std,
            d_std=args.d_std, routing=args.routing, seed=args.seed)
        base = BaseModelSpec.from_pretrained(args.base)
        adapter = generate_adapter(base, spec)
    except (ValueError, OSError) as exc:
        print(f"flylora-generate: error: {exc}", file=sys.stderr)
        return 2
    adapter.save(args.out)
    print(f"wrote {len(adapter.modules)} modules, {adapter.numel():,} numbers, r={spec.r} "
          f"top_k={adapter.config.top_k} -> {args.out}")
    return 0


def deprecated_main() -> int:
    """``flylora-generate``: the old name of ``flylora-random-adapters`` (it never generated text)."""
    print("note: `flylora-generate` is now `flylora-random-adapters`", file=sys.stderr)
    return main()


if __name__ == "__main__":
    raise SystemExit(main())
