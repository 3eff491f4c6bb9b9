"""Triton backend: two launches per layer (all slices), fixed-size buffers, no host syncs.

1. ``_shrink_topk``, grid ``(T, n)``: one program per token and slice. Gathers ``x`` through the slot's
   compact A (per-row indices and values; dense A reads whole rows), accumulates ``y`` in fp32 registers
   (``R <= 64``), adds ``d`` (``abs`` for magnitude routing), masks padded ranks to ``-inf`` and selects
   the top k by ``max_top_k`` rounds of ``argmax`` (ties: the lower rank). Writes the selected ranks and
   their ``y`` into ``sel_idx``/``sel_val`` ``[T, n, KP]`` (``KP = next_pow2(max_top_k)``).
2. ``_expand``, grid ``(T, n, cdiv(max(out_i), BLOCK_N))``: loads the k selected rows of slice ``i``'s
   block of ``b`` (``scaling * B^T``: each a contiguous row), ``sum_j y_j * b[j, cols]`` in fp32, adds to ``out``.

Every grid depends only on ``T`` and the static slot shapes, and nothing is read back to the host, so
both launches can be captured in a CUDA graph. Rows with slot ``-1`` return at once (zero delta).
Runs on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flylora_runtime.kernels.layout import FlyLoRASlots


@triton.jit
def _shrink_topk(x_ptr, slot_ptr, a_idx_ptr, a_val_ptr, d_ptr, k_ptr, r_ptr, mag_ptr, sel_idx_ptr, sel_val_ptr,
                 stride_xt, stride_as, stride_ar, stride_ds, N_SLICES, R, P,
                 R_PAD: tl.constexpr, KP: tl.constexpr, BLOCK_P: tl.constexpr, DENSE: tl.constexpr):
    t = tl.program_id(0)
    i = tl.program_id(1)
    s = tl.load(slot_ptr + t).to(tl.int64)
    if s < 0:
        return
    rk = tl.arange(0, R_PAD)
    rmask = rk < R
    row = a_val_ptr + s * stride_as + (i * R + rk).to(tl.int64) * stride_ar
    irow = a_idx_ptr + s * stride_as + (i * R + rk).to(tl.int64) * stride_ar
    y = tl.zeros([R_PAD], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        m = rmask[:, None] & (pp < P)[None, :]
        if DENSE:
            col = pp[None, :] + tl.zeros([R_PAD, BLOCK_P], dtype=tl.int32)
        else:
            col = tl.load(irow[:, None] + pp[None, :], mask=m, other=0)
        val = tl.load(row[:, None] + pp[None, :], mask=m, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + t * stride_xt + col, mask=m, other=0.0).to(tl.float32)
        y += tl.sum(val * xv, axis=1)

    r = tl.load(r_ptr + s * N_SLICES + i)
    k = tl.load(k_ptr + s * N_SLICES + i)
    mag = tl.load(mag_ptr + s)
    score = y + tl.load(d_ptr + s * stride_ds + i * R + rk, mask=rmask, other=0.0)
    score = tl.where(mag != 0, tl.abs(score), score)
    avail = rk < r
    score = tl.where(avail, score, float("-inf"))
    out_base = (t * N_SLICES + i) * KP
    for j in range(KP):
        best = tl.argmax(score, axis=0, tie_break_left=True)
        hit = rk == best
        take = (j < k) & (tl.sum((hit & avail).to(tl.int32), axis=0) > 0)
        y_best = tl.sum(tl.where(hit, y, 0.0), axis=0)
        tl.store(sel_idx_ptr + out_base + j, tl.where(take, best, 0).to(tl.int32))
        tl.store(sel_val_ptr + out_base + j, tl.where(take, y_best, 0.0))
        avail = avail & ~hit
        score = tl.where(hit, float("-inf"), score)


@triton.jit
def _expand(out_ptr, slot_ptr, b_ptr, sel_idx_ptr, sel_val_ptr, k_ptr, slice_ptr,
            stride_ot, N_SLOTS, R, N_SLICES,
            KP: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    i = tl.program_id(1)
    nb = tl.program_id(2)
    s = tl.load(slot_ptr + t).to(tl.int64)
    off = tl.load(slice_ptr + 2 * i)
    size = tl.load(slice_ptr + 2 * i + 1)
    if (s < 0) | (nb * BLOCK_N >= size):
        return
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < size
    jj = tl.arange(0, KP)
    jmask = jj < tl.load(k_ptr + s * N_SLICES + i)
    base = (t * N_SLICES + i) * KP
    idx = tl.load(sel_idx_ptr + base + jj, mask=jmask, other=0).to(tl.int64)
    yv = tl.load(sel_val_ptr + base + jj, mask=jmask, other=0.0)
    # Slice i's block [S, R, size] starts at element S*R*off; row (s, j) at (s*R + j)*size.
    block = b_ptr + N_SLOTS.to(tl.int64) * R * off
    b = tl.load(block + (s * R + idx)[:, None] * size + cols[None, :],
                mask=jmask[:, None] & cmask[None, :], other=0.0)
    acc = tl.sum(yv[:, None] * b.to(tl.float32), axis=0)  # fp32, rounded once into out
    o_ptrs = out_ptr + t.to(tl.int64) * stride_ot + off + cols
    prev = tl.load(o_ptrs, mask=cmask, other=0.0)
    tl.store(o_ptrs, (prev.to(tl.float32) + acc).to(prev.dtype), mask=cmask)


def slice_table(slots: FlyLoRASlots) -> torch.Tensor:
    """``[n, 2]`` int32 ``(offset, size)`` per slice, on the slots' device (static: build once per layer)."""
    offs, off = [], 0
    for o in slots.output_slices:
        offs.append((off, o))
        off += o
    return torch.tensor(offs, dtype=torch.int32, device=slots.device)


def apply_triton(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots: FlyLoRASlots, *,
                 slice_meta: torch.Tensor | None = None, sel_idx: torch.Tensor | None = None,
                 sel_val: torch.Tensor | None = None, block_n: int = 128) -> None:
    """Triton backend of :func:`flylora_runtime.kernels.flylora_apply` (same semantics).

    Extra (optional) arguments, for CUDA-graph capture with buffers the engine owns: ``slice_meta``
    (:func:`slice_table`), and workspaces ``sel_idx`` int32 / ``sel_val`` fp32, both ``[>= T, n, KP]``.
    Buffers that are not passed are allocated (through the caching allocator on GPU).
    """
    T, n, R = x.shape[0], slots.num_slices, slots.max_rank
    if R > 64:
        raise ValueError(f"the Triton backend keeps y in registers and needs max_rank <= 64, got {R}")
    for name, t in (("a_val", slots.a_val), ("b", slots.b), ("d", slots.d), ("k", slots.k), ("r", slots.r)):
        if not t.is_contiguous():
            raise ValueError(f"slots.{name} must be contiguous")
    if T == 0:
        return
    kp = triton.next_power_of_2(slots.max_top_k)
    dev = x.device
    if slice_meta is None:
        slice_meta = slice_table(slots)
    if sel_idx is None:
        sel_idx = torch.empty(T, n, kp, dtype=torch.int32, device=dev)
    if sel_val is None:
        sel_val = torch.empty(T, n, kp, dtype=torch.float32, device=dev)
    if sel_idx.shape[1:] != (n, kp) or sel_val.shape[1:] != (n, kp) or sel_idx.shape[0] < T \
            or sel_val.shape[0] < T or sel_idx.dtype != torch.int32 or sel_val.dtype != torch.float32:
        raise ValueError(f"sel_idx/sel_val must be int32/fp32 [>= {T}, {n}, {kp}]")
    if slots.a_packed:
        raise ValueError("packed compact slots are read by the compiled CPU kernel only; allocate the "
                         "Triton backend's slots dense or compact (packed=False)")
    dense = slots.a_idx is None
    P = slots.a_val.shape[2]
    a_idx = slots.a_val if dense else slots.a_idx  # unused when dense
    if not dense and (slots.a_idx.stride() != slots.a_val.stride() or not slots.a_idx.is_contiguous()):
        raise ValueError("slots.a_idx must be contiguous and shaped like slots.a_val")
    mag = slots.magnitude.view(torch.uint8)
    _shrink_topk[(T, n)](
        x, token_slot, a_idx, slots.a_val, slots.d, slots.k, slots.r, mag, sel_idx, sel_val,
        x.stride(0), slots.a_val.stride(0), slots.a_val.stride(1), slots.d.stride(0), n, R, P,
        R_PAD=max(16, triton.next_power_of_2(R)), KP=kp, BLOCK_P=64 if dense else 32, DENSE=dense)
    _expand[(T, n, triton.cdiv(max(slots.output_slices), block_n))](
        out, token_slot, slots.b, sel_idx, sel_val, slots.k, slice_meta,
        out.stride(0), slots.num_slots, R, n, KP=kp, BLOCK_N=block_n)
