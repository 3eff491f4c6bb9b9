"""Test data for the kernel tests: FlyLoRA-like adapters, adapter spreads over a batch, the oracle."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flylora_runtime.kernels import FlyLoRASlots, build_slots
from flylora_runtime.reference.ops import LayerAdapter, flylora_delta

SPREADS = ("distinct", "uniform", "zipf", "identical", "skewed", "runs", "none_rows", "all_none")


def make_adapter(gen: torch.Generator, n_in: int, n_out: int, r: int, k: int, routing: str = "signed",
                 scaling: float = 2.0) -> LayerAdapter:
    """The authors' init: ``p = in // (r // k)`` nonzeros per row of A, N(0, 1/r^2); B and d random
    (B is trained, d drifted during training) with scales that keep the delta O(1)."""
    p = max(1, n_in // max(1, r // k))
    cols = torch.rand(r, n_in, generator=gen).argsort(dim=1)[:, :p]
    A = torch.zeros(r, n_in).scatter_(1, cols, torch.randn(r, p, generator=gen) / r)
    sigma_y = math.sqrt(p) / r
    B = torch.randn(n_out, r, generator=gen) / math.sqrt(k) / sigma_y / 2
    d = torch.randn(r, generator=gen) * sigma_y
    return LayerAdapter(A=A, B=B, d=d, top_k=k, scaling=scaling, routing=routing)


def spread(gen: torch.Generator, kind: str, T: int, S: int) -> torch.Tensor:
    """``token_slot [T]`` int32 for a spread ``kind`` of ``S`` adapters over ``T`` tokens."""
    if kind == "distinct":  # each token its own adapter (decode with many tenants)
        if T > S:
            raise ValueError(f"distinct needs T <= S, got T={T}, S={S}")
        s = torch.randperm(S, generator=gen)[:T]
    elif kind == "uniform":
        s = torch.randint(0, S, (T,), generator=gen)
    elif kind == "zipf":
        p = 1.0 / torch.arange(1, S + 1).double() ** 1.2
        s = torch.multinomial(p, T, replacement=True, generator=gen)
    elif kind == "identical":
        s = torch.full((T,), int(torch.randint(0, S, (1,), generator=gen)))
    elif kind == "skewed":  # one popular adapter, a long tail
        s = torch.where(torch.rand(T, generator=gen) < 0.9, 0, torch.randint(0, S, (T,), generator=gen))
    elif kind == "runs":  # prefill: each request's tokens contiguous, requests in any slot order (no sort)
        s = torch.randperm(S, generator=gen)[torch.randint(0, S, (T,), generator=gen).sort().values]
    elif kind == "none_rows":
        s = torch.randint(0, S, (T,), generator=gen)
        s[torch.rand(T, generator=gen) < 0.3] = -1
    elif kind == "all_none":
        s = torch.full((T,), -1)
    else:
        raise ValueError(f"unknown spread {kind!r}")
    return s.to(torch.int32)


@dataclass
class Case:
    T: int
    n_in: int
    outs: tuple[int, ...]
    ranks: tuple[tuple[int, int], ...]  # (r, k) per adapter (slot), cycled over S adapters
    spread: str
    dtype: torch.dtype
    routing: str = "signed"  # "signed", "magnitude" or "mixed" (alternating per slot)
    compact: bool = False
    S: int = 8
    packed: bool = False  # packed compact A with 16-bit indices (the engine's CPU layout); implies compact
    seed: int = 0
    a_dtype: torch.dtype = torch.float32  # A's values in the slots (bf16: the engine's layout in bf16 engines)


def build(case: Case, device: str = "cpu"):
    """``(adapters [S][n], slots, x, token_slot, out0)`` for ``case``."""
    gen = torch.Generator().manual_seed(case.seed)
    adapters = []
    for s in range(case.S):
        r, k = case.ranks[s % len(case.ranks)]
        routing = case.routing if case.routing != "mixed" else ("signed", "magnitude")[s % 2]
        adapters.append([make_adapter(gen, case.n_in, o, r, k, routing) for o in case.outs])
    max_rank = max(r for r, _ in case.ranks)
    extra = {"packed": True, "index_dtype": torch.int16} if case.packed else {}
    slots = build_slots(adapters, compact=case.compact or case.packed, max_rank=max_rank, b_dtype=case.dtype,
                        a_dtype=case.a_dtype, device=device, **extra)
    x = torch.randn(case.T, case.n_in, generator=gen).to(case.dtype)
    token_slot = spread(gen, case.spread, case.T, case.S)
    out0 = torch.randn(case.T, sum(case.outs), generator=gen).to(case.dtype)
    return adapters, slots, x.to(device), token_slot.to(device), out0.to(device)


def expected(adapters, slots: FlyLoRASlots, x: torch.Tensor, token_slot: torch.Tensor, out0: torch.Tensor,
             tie_eps: float = 1e-5):
    """``(out0 + delta)`` in fp32 from :func:`reference.flylora_delta`, and a ``[T]`` mask of rows to compare.

    The reference mirrors the slots' storage casts: A as ``a_val`` stores it (the one cast that can change
    a selection) and ``scaling * B`` as ``b`` stores it (bf16/fp16: the model's precision, not an error
    of the kernel). ``y`` is fp32 in both; rounding ``y`` to ``b``'s dtype before the expand is left to
    the tolerance table. What remains is summation order (~1e-6 relative), which flips a top-k
    choice only when the k-th and (k+1)-th scores are within that noise; such (rare) rows are left out,
    found from the reference's own scores with a gap below ``tie_eps`` (relative).
    """
    x, token_slot = x.cpu(), token_slot.cpu().long()
    adt, bdt = slots.a_val.dtype, slots.b.dtype
    deltas, keep = [], torch.ones(x.shape[0], dtype=torch.bool)
    for i in range(len(adapters[0])):
        ws = [LayerAdapter(A=a[i].A.to(adt).float(), B=(a[i].scaling * a[i].B.float()).to(bdt).float(), d=a[i].d,
                           top_k=a[i].top_k, scaling=1.0, routing=a[i].routing) for a in adapters]
        deltas.append(flylora_delta(x, token_slot, ws))
        for t in range(x.shape[0]):
            s = int(token_slot[t])
            if s < 0 or ws[s].top_k == ws[s].A.shape[0]:
                continue
            score = x[t].float() @ ws[s].A.T + ws[s].d
            score = score.abs() if ws[s].routing == "magnitude" else score
            top = score.topk(ws[s].top_k + 1).values
            if top[-2] - top[-1] < tie_eps * (1 + top[-2].abs()):
                keep[t] = False
    return out0.cpu().float() + torch.cat(deltas, dim=1), keep
