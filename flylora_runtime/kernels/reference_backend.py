"""The ``"reference"`` backend: :func:`flylora_runtime.reference.ops.select_ranks` on each token and slice,
one at a time (slow: the benchmark's naive per-token loop, and a debug backend). Reads every slot layout
(dense, compact and packed A) through :func:`~.layout.dense_a`.
"""

from __future__ import annotations

import torch

from flylora_runtime.kernels.layout import FlyLoRASlots, dense_a
from flylora_runtime.reference.ops import select_ranks


def apply_reference(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots: FlyLoRASlots) -> None:
    """The naive backend: a Python loop over tokens and slices with :func:`reference.select_ranks`."""
    a, R = dense_a(slots), slots.max_rank
    bounds = [0]
    for o in slots.output_slices:
        bounds.append(bounds[-1] + o)
    for t in range(x.shape[0]):
        s = int(token_slot[t])
        if s < 0:
            continue
        x32 = x[t].float()
        for i in range(slots.num_slices):
            r, k = int(slots.r[s, i]), int(slots.k[s, i])
            if r == 0:
                continue
            y = a[s, i * R:i * R + r] @ x32
            routing = "magnitude" if bool(slots.magnitude[s]) else "signed"
            m = select_ranks(y[None], slots.d[s, i * R:i * R + r], k, routing)[0]
            delta = (y * m) @ slots.b_view(i)[s, :r].float()
            out[t, bounds[i]:bounds[i + 1]] = (out[t, bounds[i]:bounds[i + 1]].float() + delta).to(out.dtype)
