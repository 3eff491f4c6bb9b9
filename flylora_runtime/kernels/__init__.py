"""The batched FlyLoRA kernel: one interface, a backend per device, chosen by :func:`get_backend`.

The engine keeps, per adapted layer, preallocated device *slots* (:class:`FlyLoRASlots`), copies an
adapter into a slot to hot-swap it (:func:`load_slot`, or :func:`prepare_slot` once and :func:`write_slot`
at every swap), and calls :func:`flylora_apply` once per layer with all of the layer's slices (q/k/v of a
merged ``qkv_proj``, gate/up of ``gate_up_proj``), which share the input ``x``. Backends:

- ``"cpu"`` (:mod:`.cpu`): the compiled C kernel (:mod:`.native`, one call per layer) whenever it can be
  built and supports the call; else grouped PyTorch (dense BLAS shrink per adapter segment, top-k, then
  only the k selected rows of ``B^T`` per token).
- ``"triton"`` (:mod:`.triton_kernels`): fused sparse shrink + bias + top-k in registers, then the expand
  over the k selected rows; fixed-size buffers, no host syncs (CUDA-graph capturable).
- ``"reference"`` (:mod:`.reference_backend`): :func:`flylora_runtime.reference.ops.select_ranks` on each
  token, one at a time (slow; the "naive per-token loop" of the benchmark and a debug backend).

Ties in top-k (scores exactly equal across the k-th place; measure-zero for real inputs, see
docs/KERNELS.md): the compiled CPU kernel and Triton keep the lower rank indices; the torch CPU paths
(no compiler, ``FLYLORA_CPU_NATIVE=0``, or a call the C kernel does not support) and the reference backend
take whatever ``torch.topk`` returns (deterministic, but not lowest-index first: tested only to be k
distinct real ranks).

This module is the public API only. Where each part lives:

- :mod:`.layout`: :class:`FlyLoRASlots` (every buffer documented there) and :func:`allocate_slots`;
- :mod:`.lifecycle`: :class:`SlotImage`, :func:`prepare_slot`, :func:`write_slot`, :func:`load_slot`,
  :func:`clear_slot`, :func:`build_slots`;
- :mod:`.adapter_write`: a whole adapter's layers at once, :func:`prepare_slots`, :func:`plan_writes`,
  :func:`write_slots`;
- :mod:`.checks`: :func:`check_inputs`;
- :mod:`.registry`: :data:`BACKENDS` and :func:`get_backend`;
- the backends: :mod:`.cpu` (with :mod:`.native` and its C source ``flylora_cpu.c``), :mod:`.triton_kernels`,
  :mod:`.reference_backend`;
- the bit packing shared with the adapter's compact form: :mod:`flylora_runtime.weights.packing`.
"""

from __future__ import annotations

import torch

from flylora_runtime.kernels.checks import check_inputs
from flylora_runtime.kernels.layout import FlyLoRASlots, allocate_slots, dense_a
from flylora_runtime.kernels.adapter_write import WritePlan, plan_writes, prepare_slots, write_slots
from flylora_runtime.kernels.lifecycle import SlotImage, build_slots, clear_slot, load_slot, prepare_slot, write_slot
from flylora_runtime.kernels.reference_backend import apply_reference
from flylora_runtime.kernels.registry import BACKENDS, get_backend

__all__ = [
    "FlyLoRASlots", "SlotImage", "allocate_slots", "load_slot", "prepare_slot", "write_slot", "clear_slot",
    "prepare_slots", "write_slots", "plan_writes", "WritePlan",
    "build_slots", "flylora_apply", "get_backend", "BACKENDS", "apply_reference", "check_inputs", "dense_a",
]


def flylora_apply(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots: FlyLoRASlots, *,
                  backend: str | None = None, check_indices: bool = True) -> None:
    """Add the FlyLoRA delta of every slice of one layer to ``out``, in place.

    Args:
        out: ``[T, sum(out_i)]`` any float dtype, last dim contiguous; slice ``i`` owns columns
            ``off_i : off_i + out_i``. Written in place (added to); rows with ``token_slot == -1`` untouched.
        x: ``[T, in]`` any float dtype, last dim contiguous; shared by all slices.
        token_slot: ``[T]`` int32/int64, the slot of each token, ``-1`` for no adapter.
        slots: :class:`FlyLoRASlots` on ``x``'s device.
        backend: ``"cpu"``, ``"triton"`` or ``"reference"``; default by device (:func:`get_backend`).
        check_indices: also check the range of ``token_slot`` (a host sync on GPU; the engine, which
            builds ``token_slot`` on the host, passes False).

    Semantics::

        R, off = slots.max_rank, 0
        for i, out_i in enumerate(slots.output_slices):
            for t in range(T):
                s = token_slot[t]
                if s < 0: continue
                r, k = slots.r[s, i], slots.k[s, i]
                A = dense(slots.a_idx, slots.a_val)[s, i*R : i*R + r].float()     # [r, in]
                y = A @ x[t].float()                                               # [r] fp32
                score = y + slots.d[s, i*R : i*R + r]
                if slots.magnitude[s]: score = score.abs()
                sel = torch.topk(score, k).indices      # exact ties: see the module docstring
                out[t, off:off + out_i] += (y[sel] @ slots.b_view(i)[s, sel].float()).to(out.dtype)
            off += out_i

    Equals ``reference.flylora_delta`` per slice over each slot's real ranks (``b`` holds ``scaling * B^T``).
    Backends compute ``y`` and the expand in fp32 and round once into ``out``; only the summation order
    differs from the reference (tolerances in ``tests/helpers.py``).
    """
    check_inputs(out, x, token_slot, slots, check_indices=check_indices)
    get_backend(x.device, backend)(out, x, token_slot, slots)
