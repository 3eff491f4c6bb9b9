"""The pure-PyTorch FlyLoRA reference: the oracle every kernel and engine path is tested against.

It computes in fp32 whatever the input dtype, favours clarity over speed, and is also the slow debug
backend. docs/FLYLORA.md states the math; it matches the authors' training code (signed top-k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from flylora_runtime.weights.dense import FlyLoRAAdapter
from flylora_runtime.format.config import ROUTINGS


@dataclass(frozen=True)
class LayerAdapter:
    """One adapter's weights for one linear layer, with what the math needs.

    Attributes:
        A: ``[r, in]`` sparse projection (dense storage).
        B: ``[out, r]`` up-projection.
        d: ``[r]`` routing bias; enters the selection only.
        top_k: ranks selected per token, ``0 < top_k <= r``.
        scaling: ``lora_alpha / r``.
        routing: ``"signed"`` or ``"magnitude"``.
    """

    A: torch.Tensor
    B: torch.Tensor
    d: torch.Tensor
    top_k: int
    scaling: float
    routing: str = "signed"

    @classmethod
    def from_adapter(cls, adapter: FlyLoRAAdapter, module: str) -> "LayerAdapter":
        w = adapter.modules[module]
        c = adapter.config
        return cls(A=w.A, B=w.B, d=w.d, top_k=c.top_k, scaling=c.scaling, routing=c.routing)


def select_ranks(y: torch.Tensor, d: torch.Tensor, top_k: int, routing: str = "signed") -> torch.Tensor:
    """Boolean mask ``[T, r]`` of the ranks that fire for each token.

    Semantics::

        score = y + d                      # signed (the authors' code)
        score = (y + d).abs()              # magnitude (the paper's Eq. 7)
        sel   = torch.topk(score, top_k, dim=-1).indices
        mask  = zeros_like(y, bool).scatter_(-1, sel, True)

    Ties follow ``torch.topk``.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    r = y.shape[-1]
    if not 0 < top_k <= r:
        raise ValueError(f"top_k must satisfy 0 < top_k <= r = {r}, got {top_k}")
    score = y + d
    if routing == "magnitude":
        score = score.abs()
    sel = torch.topk(score, top_k, dim=-1).indices
    return torch.zeros_like(y, dtype=torch.bool).scatter_(-1, sel, True)


def flylora_delta_one(x: torch.Tensor, w: LayerAdapter) -> torch.Tensor:
    """FlyLoRA delta of one adapter for tokens ``x`` ``[T, in]``; returns fp32 ``[T, out]``.

    Semantics::

        y    = x @ A.T                         # [T, r]
        mask = select_ranks(y, d, top_k, routing)
        out  = scaling * (y * mask) @ B.T      # d does not enter the sum
    """
    x32 = x.to(torch.float32)
    y = x32 @ w.A.to(torch.float32).T
    mask = select_ranks(y, w.d.to(torch.float32), w.top_k, w.routing)
    return w.scaling * ((y * mask) @ w.B.to(torch.float32).T)


def flylora_delta(x: torch.Tensor, indices: torch.Tensor, adapters: Sequence[LayerAdapter]) -> torch.Tensor:
    """The batched FlyLoRA delta: token ``t`` uses ``adapters[indices[t]]``, or none when ``indices[t] < 0``.

    Args:
        x: ``[T, in]`` tokens, any float dtype (computed in fp32).
        indices: ``[T]`` integer adapter index per token; ``-1`` means no adapter (exactly zero delta).
        adapters: the adapters (ranks may differ between adapters).

    Returns:
        fp32 ``[T, out]``; the caller adds it to ``x @ W.T``.

    Semantics::

        out = zeros(T, out, float32)
        for t in range(T):
            if indices[t] >= 0:
                out[t] = flylora_delta_one(x[t:t+1], adapters[indices[t]])[0]
    """
    if x.dim() != 2 or indices.shape != (x.shape[0],):
        raise ValueError(f"expected x [T, in] and indices [T], got {tuple(x.shape)} and {tuple(indices.shape)}")
    if indices.numel() and int(indices.max()) >= len(adapters):
        raise ValueError(f"adapter index {int(indices.max())} out of range for {len(adapters)} adapters")
    if not adapters:
        raise ValueError("at least one adapter is needed to know the output size")
    out = torch.zeros(x.shape[0], adapters[0].B.shape[0], dtype=torch.float32)
    for i, w in enumerate(adapters):
        rows = (indices == i).nonzero().flatten()
        if rows.numel():
            out[rows] = flylora_delta_one(x[rows], w)
    return out
