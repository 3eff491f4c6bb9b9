"""Argument checks of :func:`flylora_runtime.kernels.flylora_apply` (every backend relies on them)."""

from __future__ import annotations

import torch

from flylora_runtime.kernels.layout import FlyLoRASlots


def check_inputs(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots: FlyLoRASlots, *,
                 check_indices: bool) -> None:
    """Raise ``ValueError`` on a shape, dtype, device or contiguity mismatch (metadata only, no sync);
    ``check_indices`` also checks ``-1 <= token_slot < S`` (reads the tensor: a host sync on GPU)."""
    T = x.shape[0] if x.dim() == 2 else -1
    if x.dim() != 2 or x.shape[1] != slots.in_features:
        raise ValueError(f"x must be [T, {slots.in_features}], got {tuple(x.shape)}")
    if out.shape != (T, sum(slots.output_slices)):
        raise ValueError(f"out must be [{T}, {sum(slots.output_slices)}], got {tuple(out.shape)}")
    if token_slot.shape != (T,) or token_slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_slot must be int32/int64 [{T}], got {token_slot.dtype} {tuple(token_slot.shape)}")
    if not (x.is_floating_point() and out.is_floating_point()):
        raise ValueError(f"x and out must be floating point, got {x.dtype} and {out.dtype}")
    dev = slots.d.device
    for name, t in (("out", out), ("x", x), ("token_slot", token_slot)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, slots on {dev}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    if check_indices and T and not bool(((token_slot >= -1) & (token_slot < slots.num_slots)).all()):
        raise ValueError(f"token_slot values must be in [-1, {slots.num_slots}), got "
                         f"[{int(token_slot.min())}, {int(token_slot.max())}]")
