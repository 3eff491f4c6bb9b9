"""CPU backend: grouped PyTorch, a handful of torch calls per layer whatever the number of slices.

Steps (all slices of a layer at once, since they share ``x``):

1. Group tokens by slot. One host read of the per-slot token counts (free on CPU).
2. Shrink ``y = A x`` in fp32, grouped: when the segments are balanced (``S * Lmax`` padded rows at most
   ``_PAD_WASTE`` times the real ones, as in decode with distinct adapters or prefill spread evenly) one
   ``bmm`` over a ``[S, Lmax, in]`` padded copy of ``x`` against all slots' A, no copy of A; otherwise one
   ``mm`` per adapter segment on a view of its slot. Dense A is used when the slots hold it: measured on
   this machine, BLAS on dense A beats gathering ``x`` through compact A's indices by 5-100x at every
   shape of the benchmark (compact slots still work, through a gather, for slots sized for the GPU).
3. Scores ``y + d`` (``abs`` for magnitude routing), padded ranks set to ``-inf``, ``topk`` over a
   ``[T, n, R]`` view: every slice in one call.
4. Expand: per slice, gather only the k selected rows of ``b`` (``[T, k, out_i]``, one ``index_select``) and one fp32 ``bmm``
   with the k selected ``y``; the sum is rounded once, into ``out``.

Ties in top-k: ``torch.topk`` (on this build the lower index first); ranks ``>= r`` and positions
``>= k`` are masked out after the top-k, so they are never selected.
"""

from __future__ import annotations

import torch

from . import FlyLoRASlots

#: Pad the grouped shrink to ``[S, Lmax]`` when that costs at most this many times the real rows
#: (plus ``_PAD_SLACK`` rows per active segment: the cost of one more ``mm`` call, measured ~10-20 us).
_PAD_WASTE = 2.0
_PAD_SLACK = 16


def _group(token_slot: torch.Tensor, num_slots: int):
    """Active rows sorted by slot, their slots, and the per-slot counts (a Python list)."""
    slot = token_slot.long()
    counts = torch.bincount(slot + 1, minlength=num_slots + 1).tolist()
    n_none = counts[0]
    seg = counts[1:]
    if max(seg) <= 1 and n_none == 0:
        return None, slot, seg  # every token its own slot: already grouped, no reordering needed
    order = torch.argsort(slot, stable=True)[n_none:]
    return order, slot[order], seg


def _shrink_rows(x: torch.Tensor, a: torch.Tensor, a_idx: torch.Tensor | None) -> torch.Tensor:
    """``[G, L, in] x [G, nR, in or P] -> [G, L, nR]`` fp32."""
    if a_idx is None:
        return torch.bmm(x, a.transpose(1, 2))
    G, L, _ = x.shape
    _, nR, P = a.shape
    g = torch.gather(x, 2, a_idx.long().view(G, 1, nR * P).expand(G, L, nR * P)).view(G, L, nR, P)
    return torch.einsum("glrp,grp->glr", g, a)


def _shrink(x: torch.Tensor, ss: torch.Tensor, seg: list[int], slots: FlyLoRASlots, grouped: bool) -> torch.Tensor:
    """``y [Ta, n*R]`` fp32 for active tokens ``x [Ta, in]`` with slots ``ss``: sorted by slot when
    ``grouped``, else each slot holds at most one token (in any order)."""
    S, Ta = slots.num_slots, x.shape[0]
    a = slots.a_val if slots.a_val.dtype == torch.float32 else slots.a_val.float()
    x = x.float()
    n_active = sum(1 for c in seg if c)
    lmax = max(seg)
    if S * lmax <= _PAD_WASTE * Ta + _PAD_SLACK * n_active:
        if lmax == 1:
            pos = ss
        else:
            starts = torch.tensor([0] + seg[:-1]).cumsum(0)
            pos = ss * lmax + torch.arange(Ta) - starts[ss]
        xp = x.new_zeros(S * lmax, x.shape[1])
        xp[pos] = x
        y = _shrink_rows(xp.view(S, lmax, -1), a, slots.a_idx)
        return y.reshape(S * lmax, -1)[pos]
    y = x.new_empty(Ta, a.shape[1])
    segments = zip(range(Ta), ss.tolist(), [1] * Ta) if not grouped else []
    if grouped:
        starts = [0]
        for c in seg[:-1]:
            starts.append(starts[-1] + c)
        segments = [(st, s, c) for s, (st, c) in enumerate(zip(starts, seg)) if c]
    for start, s, c in segments:
        idx = None if slots.a_idx is None else slots.a_idx[s:s + 1]
        y[start:start + c] = _shrink_rows(x[None, start:start + c], a[s:s + 1], idx)[0]
    return y


def apply_cpu(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots: FlyLoRASlots) -> None:
    """CPU backend of :func:`flylora_runtime.kernels.flylora_apply` (same arguments and semantics)."""
    if x.shape[0] == 0:
        return
    order, ss, seg = _group(token_slot, slots.num_slots)
    Ta = ss.shape[0]
    if Ta == 0:
        return
    n, R = slots.num_slices, slots.max_rank
    y = _shrink(x if order is None else x[order], ss, seg, slots, grouped=order is not None)  # [Ta, n*R] fp32

    score = y + slots.d[ss]
    if bool(slots.magnitude.any()):
        score = torch.where(slots.magnitude[ss].unsqueeze(1), score.abs(), score)
    score = score.view(Ta, n, R)
    rr = slots.r[ss].unsqueeze(-1)  # [Ta, n, 1]
    score.masked_fill_(torch.arange(R) >= rr, float("-inf"))
    kmax = int(slots.k.max())
    sel = torch.topk(score, kmax, dim=-1).indices  # [Ta, n, kmax], best first
    keep = (torch.arange(kmax) < slots.k[ss].unsqueeze(-1)) & (sel < rr)
    ysel = torch.gather(y.view(Ta, n, R), -1, sel).masked_fill_(~keep, 0.0)  # [Ta, n, kmax] fp32

    rows = (ss * R)[:, None, None] + sel  # [Ta, n, kmax] row of each selected expert in a [S*R, out_i] block
    deltas = []
    for i, out_i in enumerate(slots.output_slices):
        g = slots.b_view(i).view(-1, out_i).index_select(0, rows[:, i].reshape(-1))  # k rows per token
        deltas.append(torch.bmm(ysel[:, i].unsqueeze(1), g.view(Ta, kmax, out_i).float()).squeeze(1))
    delta = deltas[0] if n == 1 else torch.cat(deltas, dim=1)  # [Ta, sum(out_i)] fp32
    if order is None:
        out += delta  # computed in fp32, rounded once to out's dtype
    else:
        out[order] += delta
