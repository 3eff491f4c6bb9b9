"""CPU backend: the compiled kernel (:mod:`.native`, one C call per layer) when a C compiler is present,
else PyTorch, a handful of torch calls per layer whatever the number of slices.

The compiled kernel serves every call it supports (fp32/bf16/fp16 tensors, ``R <= 64``): measured on this
machine it is 2.5x faster than the torch paths below at decode (16 tokens, 16 adapters) and 3-5x at mixed
prefill + decode batches (133-512 tokens), see docs/KERNELS.md. The torch paths remain the fallback (no
compiler, ``FLYLORA_CPU_NATIVE=0``) and the tests' second implementation.

Two torch paths, chosen by the token count ``T`` (:data:`SMALL_T`), with the same results:

**Small path** (``T <= SMALL_T``: decode, short prompts). Per-call overhead dominates here, so it keeps the
torch calls to a minimum and never sorts:

1. One host read of ``token_slot`` (plus three tiny reads of ``k``, ``r`` and ``magnitude``): grouping by
   slot happens in Python on a list of at most ``SMALL_T`` ints, not with ``bincount``/``argsort``.
2. Shrink ``y = A x`` in fp32 with one BLAS call per *active* slot on a view of that slot's dense A
   (``mv`` for one token, ``mm`` for a run of tokens): only the A of slots present in the batch is read,
   nothing is copied, empty or absent slots cost nothing. Exception: when at least half of the slots
   are in the batch (each with one token, or several scattered ones), one ``bmm`` over all slots with
   ``x`` padded to ``[S, Lmax, in]`` (positions computed in Python): one streaming pass over A instead
   of many small calls (measured 0.67-0.85x the per-slot calls at 16-64 tokens with 16 slots).
3. Scores ``y + d`` for every slice at once, one ``topk`` over a ``[Ta, n, R]`` view. When every active
   slot has ``r == R`` and the same ``k`` (the common case), no rank masks are built at all.
4. Expand as in the grouped path, but added slice by slice straight into ``out``'s columns (each column
   is still rounded exactly once).

**Grouped path** (``T > SMALL_T``: prefill):

1. Group tokens by slot. One host read of the per-slot token counts (free on CPU); no sort when each
   slot's rows already form one contiguous run (prefill: a request's tokens are contiguous) or when
   every slot holds at most one row.
2. Shrink ``y = A x`` in fp32, grouped: when the segments are balanced (``S * Lmax`` padded rows at most
   ``_PAD_WASTE`` times the real ones, as in prefill spread evenly over every slot) one ``bmm`` over a
   ``[S, Lmax, in]`` padded copy of ``x`` against all slots' A, no copy of A; otherwise one ``mm`` per
   adapter segment on a view of its slot. Dense A is used when the slots hold it: measured on this
   machine, BLAS on dense A beats gathering ``x`` through compact A's indices by 5-100x at every shape of
   the benchmark (compact slots still work, through a gather, for slots sized for the GPU).
3. Scores ``y + d`` (``abs`` for magnitude routing), padded ranks set to ``-inf``, ``topk`` over a
   ``[Ta, n, R]`` view: every slice in one call.
4. Expand, the sum rounded once into ``out``. Long segments (``Ta * k >= R * active slots``: the
   slots' whole blocks are fewer rows of ``b`` than k rows per token): scatter the k selected ``y`` into a zero ``[Ta, n, R]`` and one fp32
   ``mm`` per segment and slice with the slot's whole ``[R, out_i]`` block of ``b`` (R/k times the flops,
   but no per-token gather and cast: 2-4x faster at 256 tokens). Short segments: per slice, gather only
   the k selected rows of ``b`` (``[Ta, k, out_i]``, one ``index_select``) and one fp32 ``bmm``.

Ties in top-k: both paths call ``torch.topk(score, kmax, dim=-1)`` on fp32 ``[Ta, n, R]`` scores. Among
exactly equal scores ATen's CPU kernel does NOT return the lowest rank index first (on this build, 8
equal scores with k=2 give ranks 5 and 7); the choice is deterministic for a given input. Padded ranks
(``>= r``) are set to ``-inf`` before the top-k and positions ``>= k`` are masked after it, so a padded
rank is never selected. Rows with slot ``-1``, and rows of empty slots, are never written.
"""

from __future__ import annotations

import torch

from flylora_runtime.kernels import native
from flylora_runtime.kernels.layout import FlyLoRASlots

#: Pad the grouped shrink to ``[S, Lmax]`` when that costs at most this many times the real rows
#: (plus ``_PAD_SLACK`` rows per active segment: the cost of one more ``mm`` call, measured ~10-20 us).
_PAD_WASTE = 2.0
_PAD_SLACK = 16

#: Token counts up to this run the small path (see the module docstring). Measured crossover on this
#: machine: the small path wins at every decode shape and is on par with the grouped one at 64 tokens.
SMALL_T = 64



def _group(token_slot: torch.Tensor, num_slots: int):
    """``(order, ss, seg, runs)``: the permutation of the active rows that makes each slot's rows contiguous
    (``None`` when none is needed), their slots in that order, the per-slot counts (a Python list), and the
    segments ``[(start, slot, count)]`` in row order (``None`` when every slot holds at most one row)."""
    slot = token_slot.long()
    counts = torch.bincount(slot + 1, minlength=num_slots + 1).tolist()
    n_none = counts[0]
    seg = counts[1:]
    n_active = sum(1 for c in seg if c)
    if n_none == 0:
        if max(seg) <= 1:
            return None, slot, seg, None  # every token its own slot: no reordering needed
        starts = [0] + (torch.nonzero(slot[1:] != slot[:-1]).view(-1) + 1).tolist()
        if len(starts) == n_active:  # each slot's rows already form one run (prefill): no sort
            slot_of = slot[starts].tolist()
            ends = starts[1:] + [slot.shape[0]]
            return None, slot, seg, [(st, s, e - st) for st, s, e in zip(starts, slot_of, ends)]
    order = torch.argsort(slot, stable=True)[n_none:]
    runs, start = [], 0
    for s, c in enumerate(seg):
        if c:
            runs.append((start, s, c))
            start += c
    return order, slot[order], seg, runs


def _shrink_rows(x: torch.Tensor, a: torch.Tensor, a_idx: torch.Tensor | None) -> torch.Tensor:
    """``[G, L, in] x [G, nR, in or P] -> [G, L, nR]`` fp32."""
    if a_idx is None:
        return torch.bmm(x, a.transpose(1, 2))
    G, L, _ = x.shape
    _, nR, P = a.shape
    g = torch.gather(x, 2, a_idx.long().view(G, 1, nR * P).expand(G, L, nR * P)).view(G, L, nR, P)
    return torch.einsum("glrp,grp->glr", g, a)


def _shrink(x: torch.Tensor, ss: torch.Tensor, seg: list[int], slots: FlyLoRASlots,
            runs: list[tuple[int, int, int]] | None) -> torch.Tensor:
    """``y [Ta, n*R]`` fp32 for active tokens ``x [Ta, in]`` with slots ``ss``, each slot's rows the
    segment ``runs`` names, or (``runs is None``) each slot holding at most one row, in any order."""
    S, Ta = slots.num_slots, x.shape[0]
    a = slots.a_val if slots.a_val.dtype == torch.float32 else slots.a_val.float()
    x = x.float()
    n_active = sum(1 for c in seg if c)
    lmax = max(seg)
    if S * lmax <= _PAD_WASTE * Ta + _PAD_SLACK * n_active:
        if runs is None:
            pos = ss
        else:
            first = [0] * S
            for start, s, _ in runs:
                first[s] = start
            pos = ss * lmax + torch.arange(Ta) - torch.tensor(first)[ss]
        xp = x.new_zeros(S * lmax, x.shape[1])
        xp[pos] = x
        y = _shrink_rows(xp.view(S, lmax, -1), a, slots.a_idx)
        return y.reshape(S * lmax, -1)[pos]
    y = x.new_empty(Ta, a.shape[1])
    for start, s, c in runs if runs is not None else zip(range(Ta), ss.tolist(), [1] * Ta):
        idx = None if slots.a_idx is None else slots.a_idx[s:s + 1]
        y[start:start + c] = _shrink_rows(x[None, start:start + c], a[s:s + 1], idx)[0]
    return y


def apply_cpu(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots: FlyLoRASlots, *,
              path: str | None = None) -> None:
    """CPU backend of :func:`flylora_runtime.kernels.flylora_apply` (same arguments and semantics).

    ``path``: ``"native"`` (the compiled kernel, :mod:`.native`), ``"small"`` or ``"grouped"`` (torch)
    forces one path (tests, benchmark); default: ``"native"`` when the compiled kernel is available and
    supports the call, else ``"small"`` when ``T <= SMALL_T``, else ``"grouped"``. All give the same result
    up to fp32 summation order (and, on exact top-k ties, the choice among the tied ranks).
    """
    T = x.shape[0]
    if T == 0:
        return
    if path is None or path == "native":
        lib = native.library()
        if lib is not None and native.supports(out, x, token_slot, slots):
            native.apply_native(lib, out, x, token_slot, slots)
            return
        if path == "native":
            raise RuntimeError("the compiled CPU kernel is unavailable or does not support this call "
                               "(see flylora_runtime.kernels.native)")
        path = "small" if T <= SMALL_T else "grouped"
    if slots.a_packed:
        raise RuntimeError("packed compact slots are read by the compiled CPU kernel only (path 'native'), "
                           "which is unavailable or does not support this call")
    if path == "small":
        _apply_small(out, x, token_slot, slots)
    elif path == "grouped":
        _apply_grouped(out, x, token_slot, slots)
    else:
        raise ValueError(f"path must be 'native', 'small', 'grouped' or None, got {path!r}")


def _apply_small(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots: FlyLoRASlots) -> None:
    """The small-``T`` path: Python-side grouping, one BLAS call per active slot, no sort."""
    ts = token_slot.tolist()
    T = len(ts)
    act = None  # positions of rows with an adapter, when some rows have none
    if min(ts) < 0:
        act = [t for t, s in enumerate(ts) if s >= 0]
        if not act:
            return
        ts = [ts[t] for t in act]
    meta = slots.host_meta  # (k, r, magnitude) per slot, no tensor read
    groups: dict[int, list[int]] = {}
    for t, s in enumerate(ts):
        groups.setdefault(s, []).append(t)
    if not all(any(meta[s][0]) for s in groups):  # rows of empty slots (k = 0) get zero delta: drop them
        keep = [t for t, s in enumerate(ts) if any(meta[s][0])]
        if not keep:
            return
        act = keep if act is None else [act[t] for t in keep]
        ts = [ts[t] for t in keep]
        groups = {}
        for t, s in enumerate(ts):
            groups.setdefault(s, []).append(t)
    Ta, n, R = len(ts), slots.num_slices, slots.max_rank
    act_t = None if act is None else torch.tensor(act)
    xa = x if act_t is None else x.index_select(0, act_t)
    if xa.dtype != torch.float32:
        xa = xa.float()
    ss = token_slot if act is None else torch.tensor(ts)

    # Shrink: one BLAS call per active slot, on a view of its A (no copy of A, absent slots not read);
    # or, when most slots hold several tokens each (scattered), one bmm over all slots with x padded to
    # [S, Lmax, in], as the grouped path does, with the padded positions computed here in Python.
    S = slots.num_slots
    lmax = max(len(p) for p in groups.values())
    scattered = any(p[-1] - p[0] + 1 != len(p) for p in groups.values())
    if (slots.a_idx is None and slots.a_val.dtype == torch.float32 and 2 * len(groups) >= S
            and (lmax == 1 or scattered) and S * lmax <= _PAD_WASTE * Ta + _PAD_SLACK * len(groups)):
        pad_pos = [0] * Ta
        for s, pos in groups.items():
            for j, t in enumerate(pos):
                pad_pos[t] = s * lmax + j
        pp = torch.tensor(pad_pos)
        xp = xa.new_zeros(S * lmax, xa.shape[1])
        xp[pp] = xa
        y = torch.bmm(xp.view(S, lmax, -1), slots.a_val.transpose(1, 2)).view(S * lmax, -1)[pp]
        per_slot = {}
    else:
        y = xa.new_empty(Ta, n * R)
        per_slot = groups
    x_rows = y_rows = None
    for s, pos in per_slot.items():
        a_s = slots.a_rows[s]
        if a_s.dtype != torch.float32:
            a_s = a_s.float()
        p0, p1 = pos[0], pos[-1] + 1
        if slots.a_idx is not None:
            rows = xa[p0:p1] if p1 - p0 == len(pos) else xa.index_select(0, torch.tensor(pos))
            ys = _shrink_rows(rows.unsqueeze(0), a_s.unsqueeze(0), slots.a_idx[s:s + 1])[0]
            if p1 - p0 == len(pos):
                y[p0:p1] = ys
            else:
                y.index_copy_(0, torch.tensor(pos), ys)
        elif len(pos) == 1:
            if x_rows is None:  # one unbind per call instead of two Python-level selects per token
                x_rows, y_rows = xa.unbind(0), y.unbind(0)
            torch.mv(a_s, x_rows[p0], out=y_rows[p0])
        elif p1 - p0 == len(pos):
            torch.mm(xa[p0:p1], a_s.t(), out=y[p0:p1])
        else:
            pi = torch.tensor(pos)
            y.index_copy_(0, pi, torch.mm(xa.index_select(0, pi), a_s.t()))

    # Scores and top-k, every slice at once.
    score = slots.d.index_select(0, ss).add_(y)  # [Ta, n*R] fp32
    if any(meta[s][2] for s in groups):
        score = torch.where(slots.magnitude.index_select(0, ss).unsqueeze(1), score.abs(), score)
    kmax = max(max(meta[s][0]) for s in groups)
    uniform = all(r == R for s in groups for r in meta[s][1]) and all(k == kmax for s in groups for k in meta[s][0])
    score = score.view(Ta, n, R)
    if not uniform:
        rr = slots.r.index_select(0, ss).unsqueeze(-1)  # [Ta, n, 1]
        score.masked_fill_(torch.arange(R) >= rr, float("-inf"))
    sel = torch.topk(score, kmax, dim=-1).indices  # [Ta, n, kmax], best first
    ysel = torch.gather(y.view(Ta, n, R), -1, sel)  # [Ta, n, kmax] fp32
    if not uniform:
        keep = (torch.arange(kmax) < slots.k.index_select(0, ss).unsqueeze(-1)) & (sel < rr)
        ysel.masked_fill_(~keep, 0.0)

    # Expand: k rows of b per token and slice, one fp32 bmm per slice, rounded once into out.
    rows = sel + (ss.reshape(Ta, 1, 1) * R)  # row of each selected expert in a [S*R, out_i] block
    if n > 1:
        rows, ysel = rows.transpose(0, 1).contiguous(), ysel.transpose(0, 1)  # [n, Ta, kmax]
    else:
        rows, ysel = rows.view(1, Ta, kmax), ysel.view(1, Ta, kmax)
    deltas, off = [], 0
    for i, out_i in enumerate(slots.output_slices):
        g = slots.b_rows[i].index_select(0, rows[i].view(-1)).view(Ta, kmax, out_i)
        delta = torch.bmm(ysel[i].unsqueeze(1), g if g.dtype == torch.float32 else g.float()).view(Ta, out_i)
        if act_t is None:
            out[:, off:off + out_i].add_(delta)  # fp32 sum, rounded once to out's dtype
        else:
            deltas.append(delta)
        off += out_i
    if act_t is not None:
        upd = out.index_select(0, act_t)
        upd += deltas[0] if n == 1 else torch.cat(deltas, dim=1)
        out.index_copy_(0, act_t, upd)


def _expand_dense(ysel: torch.Tensor, sel: torch.Tensor, runs: list[tuple[int, int, int]],
                  slots: FlyLoRASlots) -> torch.Tensor:
    """Expand for long segments (rows sorted by slot): scatter the k selected ``y`` into a zero
    ``[Ta, n, R]`` (unselected ranks exactly 0) and one fp32 ``mm`` per segment and slice with the slot's
    whole ``[R, out_i]`` block of ``b``: ``R / k`` times the flops of the k-row gather, but no
    ``[Ta * k, out_i]`` gather and cast, which dominate at prefill. Returns ``[Ta, sum(out_i)]`` fp32."""
    Ta, n, _ = ysel.shape
    R = slots.max_rank
    ym = ysel.new_zeros(Ta, n, R).scatter_(-1, sel, ysel)  # dropped positions carry 0.0 (distinct indices)
    delta = ysel.new_empty(Ta, sum(slots.output_slices))
    off = 0
    for i, out_i in enumerate(slots.output_slices):
        b3 = slots.b_view(i)
        d_i = delta[:, off:off + out_i]
        for start, s, c in runs:
            b_s = b3[s] if b3.dtype == torch.float32 else b3[s].float()
            d_i[start:start + c] = ym[start:start + c, i] @ b_s
        off += out_i
    return delta


def _apply_grouped(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots: FlyLoRASlots) -> None:
    """The grouped path: sort by slot, one matmul per segment (or one padded bmm), batched top-k."""
    order, ss, seg, runs = _group(token_slot, slots.num_slots)
    empty = [s for s, c in enumerate(seg) if c and not any(slots.host_meta[s][0])]
    if empty:  # rows of empty slots are left alone like rows with slot -1 (not even a zero added)
        token_slot = token_slot.masked_fill(torch.isin(token_slot, torch.tensor(empty)), -1)
        order, ss, seg, runs = _group(token_slot, slots.num_slots)
    Ta = ss.shape[0]
    if Ta == 0:
        return
    n, R = slots.num_slices, slots.max_rank
    y = _shrink(x if order is None else x[order], ss, seg, slots, runs)  # [Ta, n*R] fp32

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

    n_active = sum(1 for c in seg if c)
    # Whole [R, out_i] blocks per segment when they are fewer rows of b than k rows per token (at 256
    # tokens: 2x faster at 64 adapters of hidden 4096, 2-4x at 1-8 adapters).
    if runs is not None and Ta * kmax >= R * n_active:
        delta = _expand_dense(ysel, sel, runs, slots)
    else:
        rows = (ss * R)[:, None, None] + sel  # [Ta, n, kmax] row of each selected expert in a [S*R, out_i] block
        deltas = []
        for i, out_i in enumerate(slots.output_slices):
            g = slots.b_rows[i].index_select(0, rows[:, i].reshape(-1))  # k rows per token
            deltas.append(torch.bmm(ysel[:, i].unsqueeze(1), g.view(Ta, kmax, out_i).float()).squeeze(1))
        delta = deltas[0] if n == 1 else torch.cat(deltas, dim=1)  # [Ta, sum(out_i)] fp32
    if order is None:
        out += delta  # computed in fp32, rounded once to out's dtype
    else:
        out[order] += delta
