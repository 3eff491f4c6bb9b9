"""The batched FlyLoRA kernel: one interface, a backend per device, chosen by :func:`get_backend`.

The engine keeps, per adapted layer, preallocated device *slots* (:class:`FlyLoRASlots`), copies an
adapter into a slot to hot-swap it (:func:`load_slot`), and calls :func:`flylora_apply` once per layer
with all of the layer's slices (q/k/v of a merged ``qkv_proj``, gate/up of ``gate_up_proj``), which share
the input ``x``. Backends:

- ``"cpu"`` (:mod:`.cpu`): grouped PyTorch; dense BLAS shrink per adapter segment, top-k, then only the
  k selected rows of ``B^T`` per token.
- ``"triton"`` (:mod:`.triton_kernels`): fused sparse shrink + bias + top-k in registers, then the expand
  over the k selected rows; fixed-size buffers, no host syncs (CUDA-graph capturable).
- ``"reference"``: :func:`flylora_runtime.reference.ops.select_ranks` on each token, one at a time (slow; the
  "naive per-token loop" of the benchmark and a debug backend).

Ties in top-k (scores exactly equal across the k-th place; measure-zero for real inputs, see
docs/KERNELS.md): Triton keeps the lowest rank indices; the CPU and reference backends take whatever
``torch.topk`` returns (deterministic, but not lowest-index first: tested only to be k distinct real ranks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from flylora_runtime.weights.compact import _BITS_VIEW, compact_rows
from flylora_runtime.reference.ops import LayerAdapter, select_ranks

__all__ = [
    "FlyLoRASlots", "SlotImage", "allocate_slots", "load_slot", "prepare_slot", "write_slot", "clear_slot",
    "build_slots", "flylora_apply", "get_backend", "BACKENDS", "apply_reference", "check_inputs",
]


@dataclass
class FlyLoRASlots:
    """Stacked slot buffers of one adapted layer, all of its slices (``n`` of them) together.

    ``S`` slots, ranks padded to ``R``, ``n`` slices with outputs ``output_slices = (out_0, ...)``.
    Slice ``i``'s ranks live in rows ``i*R : (i+1)*R`` of the A and d buffers, its ``B^T`` in the
    contiguous block :meth:`b_view` ``(i)`` ``[S, R, out_i]`` of the flat ``b``, and its outputs in columns
    ``off_i : off_i + out_i`` of ``out`` (``off_i = sum(output_slices[:i])``). Padded ranks
    (``j >= r[s, i]``) hold zeros and are never selected, whatever they hold.

    Attributes:
        output_slices: ``(out_0, ..., out_{n-1})``.
        max_rank: ``R``, the padded rank of every slot and slice.
        max_top_k: upper bound of every ``k[s, i]`` (sizes the Triton top-k buffers; ``<= R``).
        in_features: ``in``.
        a_idx: compact A: ``[S, n*R, P]`` int32 column indices (padding: column 0 with value 0.0), or
            ``None`` when A is stored dense.
        a_val: compact: ``[S, n*R, P]`` values; dense: ``[S, n*R, in]``. Any float dtype (fp32 keeps
            the shrink, which always accumulates in fp32, bit-comparable to the reference).
        b: flat ``[S * R * sum(out_i)]``: slice ``i`` is the block ``b_view(i)`` ``[S, R, out_i]``
            starting at element ``S * R * off_i``, ``b_view(i)[s, j, o] = scaling * B_i[o, j]``: row ``j``
            is rank-expert ``j``, so the k selected experts are k contiguous rows (one ``index_select``
            on CPU, coalesced loads on GPU).
        a_nnz: packed compact A only: ``[S, n]`` int32, the entries per row of each slot's slice (its
            densest row's nonzero count; shorter rows are padded with column 0, value 0.0).
        a_packed: packed compact A (the compiled CPU kernel's layout, :mod:`.native`): slot ``s``'s slice
            ``i`` occupies the flat block ``a_idx[s].view(-1)[i*R*P : (i+1)*R*P]`` (same for ``a_val``),
            and its row ``j`` is the ``a_nnz[s, i]`` entries starting at ``j * a_nnz[s, i]`` of that block:
            the rows an adapter really has are contiguous, whatever ``P`` was allocated. Only the
            compiled CPU kernel and the reference backend read it.
        a_mask: packed compact A only: ``[S, n*R, ceil(in/16)]`` int16 (read as unsigned) column bitmasks,
            bit ``c`` of word ``w`` of row ``j`` set when the row has an entry at column ``16*w + c``. The
            row's entries are in column order, so word ``w``'s are its next ``popcount`` values: the
            compiled kernel's decode shrink expands them into 16 columns at a time (no gathers, and the
            indices are not read).
        d: ``[S, n*R]`` fp32 routing bias.
        k: ``[S, n]`` int32 ranks selected per token (0 for an empty slot).
        r: ``[S, n]`` int32 real ranks (0 for an empty slot).
        magnitude: ``[S]`` bool, True: top-k of ``|y + d|`` instead of ``y + d``.
        host_meta: ``host_meta[s] = (k[s], r[s], magnitude[s])`` as Python tuples/bool, a host mirror of
            those three tensors kept by :func:`load_slot` / :func:`clear_slot` so that the CPU backend
            plans a call without reading them (change slots only through those two functions).
        b_rows: ``b_rows[i] = b_view(i).view(S * R, out_i)``, built once: the k selected experts of
            token ``t`` are rows ``slot * R + sel`` of it.
        a_rows: ``a_rows[s] = a_val[s]``, views built once (saves an indexing call per active slot).
        host_extent: ``host_extent[s][i] = (r, p)``: slot ``s``'s slice ``i`` may hold nonzeros only in its first
            ``r`` rows (and, in compact A, first ``p`` entries per row; packed: the first ``r * p`` entries of
            its block); ``None``: anywhere. Kept by :func:`write_slot` / :func:`clear_slot`, so that writing an
            adapter over one no larger needs no clearing first (clearing was half of a hot swap's time).

    Worked example: S=4, R=32, in=576, qkv of SmolLM2 (576, 192, 192), P=144 (quarter-dense rows),
    bf16 B, fp32 A. ``a_idx`` [4, 96, 144] int32 221 KB; ``a_val`` [4, 96, 144] fp32 221 KB (dense
    instead: [4, 96, 576] fp32 885 KB); ``b`` [4*32*960] bf16 246 KB (q block [4, 32, 576] first, then
    k and v [4, 32, 192] each); ``d`` [4, 96] fp32 1.5 KB;
    ``k``, ``r`` [4, 3] int32; ``magnitude`` [4] bool. One slot is a quarter of each buffer.
    """

    output_slices: tuple[int, ...]
    max_rank: int
    max_top_k: int
    in_features: int
    a_idx: torch.Tensor | None
    a_val: torch.Tensor
    b: torch.Tensor
    d: torch.Tensor
    k: torch.Tensor
    r: torch.Tensor
    magnitude: torch.Tensor
    a_nnz: torch.Tensor | None = None
    a_packed: bool = False
    a_mask: torch.Tensor | None = None
    host_meta: list[tuple[tuple[int, ...], tuple[int, ...], bool]] = field(default=None, repr=False)  # type: ignore[assignment]
    b_rows: tuple[torch.Tensor, ...] = field(default=None, repr=False)  # type: ignore[assignment]
    a_rows: tuple[torch.Tensor, ...] = field(default=None, repr=False)  # type: ignore[assignment]
    host_extent: list[tuple[tuple[int, int], ...] | None] = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.host_extent is None:  # unknown contents: the first write clears
            self.host_extent = [None] * self.num_slots
        if self.host_meta is None:
            ks, rs, ms = self.k.tolist(), self.r.tolist(), self.magnitude.tolist()
            self.host_meta = [(tuple(k), tuple(r), bool(m)) for k, r, m in zip(ks, rs, ms)]
        if self.b_rows is None:
            self.b_rows = tuple(self.b_view(i).view(-1, o) for i, o in enumerate(self.output_slices))
        if self.a_rows is None:
            self.a_rows = self.a_val.unbind(0)

    @property
    def num_slots(self) -> int:
        return self.d.shape[0]

    @property
    def num_slices(self) -> int:
        return len(self.output_slices)

    @property
    def dense(self) -> bool:
        return self.a_idx is None

    @property
    def device(self) -> torch.device:
        return self.d.device

    def b_view(self, i: int) -> torch.Tensor:
        """Slice ``i``'s block of ``b``: ``[S, R, out_i]``, contiguous, a view (writes go to ``b``)."""
        S, R = self.num_slots, self.max_rank
        off = sum(self.output_slices[:i])
        return self.b[S * R * off:S * R * (off + self.output_slices[i])].view(S, R, self.output_slices[i])


def allocate_slots(num_slots: int, max_rank: int, in_features: int, output_slices: Sequence[int], *,
                   max_nnz: int | None = None, max_top_k: int | None = None,
                   a_dtype: torch.dtype = torch.float32, b_dtype: torch.dtype = torch.bfloat16,
                   device: torch.device | str = "cpu", packed: bool = False,
                   index_dtype: torch.dtype = torch.int32) -> FlyLoRASlots:
    """Zeroed slots (every slot empty: ``k = r = 0``). ``max_nnz=None`` stores A dense, else compact
    with ``P = max_nnz`` entries per row (an adapter whose rows hold more cannot be loaded).

    ``packed=True`` (compact only) uses the packed layout of :attr:`FlyLoRASlots.a_packed`; with
    ``max_nnz = in_features`` any adapter fits (plain LoRA's dense rows too) and the kernel reads only
    the entries an adapter has. ``index_dtype``: ``torch.int32``, or ``torch.int16`` when
    ``in_features <= 32767`` (a third less memory traffic per nonzero).
    """
    output_slices = tuple(int(o) for o in output_slices)
    if num_slots <= 0 or max_rank <= 0 or in_features <= 0 or not output_slices or min(output_slices) <= 0:
        raise ValueError(f"expected positive sizes, got num_slots={num_slots}, max_rank={max_rank}, "
                         f"in_features={in_features}, output_slices={output_slices}")
    max_top_k = max_rank if max_top_k is None else max_top_k
    if not 0 < max_top_k <= max_rank:
        raise ValueError(f"max_top_k must satisfy 0 < max_top_k <= max_rank = {max_rank}, got {max_top_k}")
    if max_nnz is not None and not 0 < max_nnz <= in_features:
        raise ValueError(f"max_nnz must satisfy 0 < max_nnz <= in_features = {in_features}, got {max_nnz}")
    if packed and max_nnz is None:
        raise ValueError("packed=True needs compact A (max_nnz)")
    if index_dtype not in (torch.int32, torch.int16) or (index_dtype == torch.int16 and in_features > 32767):
        raise ValueError(f"index_dtype must be torch.int32, or torch.int16 for in_features <= 32767; got "
                         f"{index_dtype} for in_features={in_features}")
    n, S, R = len(output_slices), num_slots, max_rank
    zeros = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    return FlyLoRASlots(
        output_slices=output_slices, max_rank=R, max_top_k=max_top_k, in_features=in_features,
        a_idx=None if max_nnz is None else zeros(S, n * R, max_nnz, dtype=index_dtype),
        a_val=zeros(S, n * R, in_features if max_nnz is None else max_nnz, dtype=a_dtype),
        b=zeros(S * R * sum(output_slices), dtype=b_dtype), d=zeros(S, n * R, dtype=torch.float32),
        k=zeros(S, n, dtype=torch.int32), r=zeros(S, n, dtype=torch.int32),
        magnitude=zeros(S, dtype=torch.bool), a_nnz=zeros(S, n, dtype=torch.int32) if packed else None,
        a_packed=packed, a_mask=zeros(S, n * R, (in_features + 15) // 16, dtype=torch.int16) if packed else None,
        host_extent=[((0, 0),) * n] * S)


def clear_slot(slots: FlyLoRASlots, slot: int) -> None:
    """Empty ``slot`` in place (zeros everywhere, ``k = r = 0``: it contributes nothing). A slot already known
    empty (``host_extent``) is left as it is: vLLM resets every layer an adapter does not target on each
    activation, and with 1,000 q/v adapters cycling through 16 slots, clearing o/gate_up/down again each
    time was 3% of the engine's time."""
    empty = ((0, 0),) * slots.num_slices
    if slots.host_extent[slot] == empty:
        return
    for t in (slots.a_val, slots.d, slots.k, slots.r, slots.magnitude):
        t[slot].zero_()
    for i in range(slots.num_slices):
        slots.b_view(i)[slot].zero_()
    if slots.a_idx is not None:
        slots.a_idx[slot].zero_()
    if slots.a_nnz is not None:
        slots.a_nnz[slot].zero_()
    if slots.a_mask is not None:
        slots.a_mask[slot].zero_()
    slots.host_meta[slot] = ((0,) * slots.num_slices, (0,) * slots.num_slices, False)
    slots.host_extent[slot] = empty


@dataclass(frozen=True)
class SlotImage:
    """One adapter's weights for one layer, already in a slot layout (:func:`prepare_slot`): writing it into
    a slot (:func:`write_slot`) is a few copies, without the compaction and bitmasks that make up most of
    :func:`load_slot`'s time. The engine keeps one per adapter and layer while the adapter is in its CPU
    cache, so a hot swap of a cached adapter only copies (a 1,000-adapter workload activates adapters
    several times a second). It holds the compacted A; B^T (when unscaled) and d are views of the
    adapter's own tensors, so the image must not outlive changes to them. ``layout`` names the slot layout
    it was made for."""

    layout: tuple
    a_idx: tuple[torch.Tensor | None, ...]  # per slice: packed [r*p], compact [r, p], or None (dense A)
    a_val: tuple[torch.Tensor, ...]  # per slice: packed [r*p], compact [r, p] or dense [r, in], slot dtype
    a_mask: tuple[torch.Tensor | None, ...]  # per slice: [r, ceil(in/16)] int16 (packed only)
    b: tuple[torch.Tensor, ...]  # per slice: [r, out_i] = scaling * B^T (unscaled: a view of B, any dtype)
    d: tuple[torch.Tensor, ...]  # per slice: [r] fp32
    k: torch.Tensor  # [n] int32
    r: torch.Tensor  # [n] int32
    nnz: torch.Tensor  # [n] int32 (packed: entries per row; else zeros)
    host_meta: tuple[tuple[int, ...], tuple[int, ...], bool]  # (k, r, magnitude) for FlyLoRASlots.host_meta
    extent: tuple[tuple[int, int], ...]  # per slice (r, p): what it writes (FlyLoRASlots.host_extent)


def _layout(slots: FlyLoRASlots) -> tuple:
    return (slots.in_features, slots.output_slices, slots.max_rank, slots.max_top_k, slots.a_val.dtype,
            None if slots.a_idx is None else (slots.a_idx.dtype, slots.a_idx.shape[-1]), slots.a_packed,
            slots.b.dtype, slots.device)


def prepare_slot(slots: FlyLoRASlots, adapters: Sequence[LayerAdapter], *, check_finite: bool = True) -> SlotImage:
    """One adapter's weights for every slice (``adapters[i]`` for slice ``i``), converted to ``slots``'
    layout (nothing is written to ``slots``). Raises ``ValueError`` as :func:`load_slot` does."""
    if len(adapters) != slots.num_slices:
        raise ValueError(f"expected {slots.num_slices} slice adapters, got {len(adapters)}")
    routings = {w.routing for w in adapters}
    if len(routings) != 1:
        raise ValueError(f"all slices of one adapter must share the routing, got {sorted(routings)}")
    R, n_in = slots.max_rank, slots.in_features
    for i, w in enumerate(adapters):
        r, out = w.A.shape[0], slots.output_slices[i]
        if w.A.shape != (r, n_in) or w.B.shape != (out, r) or w.d.shape != (r,):
            raise ValueError(f"slice {i}: expected A [r, {n_in}], B [{out}, r], d [r], got "
                             f"{tuple(w.A.shape)}, {tuple(w.B.shape)}, {tuple(w.d.shape)}")
        if r > R or not 0 < w.top_k <= min(r, slots.max_top_k):
            raise ValueError(f"slice {i}: need r <= {R} and 0 < top_k <= min(r, {slots.max_top_k}), "
                             f"got r={r}, top_k={w.top_k}")
        for name, t in (("A", w.A), ("B", w.B), ("d", w.d)) if check_finite else ():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"slice {i}: {name} holds non-finite values (inf or NaN)")
    from flylora_runtime.kernels import native

    dev = slots.device
    a_idx, a_val, a_mask, bs, ds, nnz, extent = [], [], [], [], [], [], []
    for i, w in enumerate(adapters):
        if slots.a_idx is None:
            a_idx.append(None), a_mask.append(None), nnz.append(0), extent.append((w.A.shape[0], 0))
            a_val.append(w.A.to(device=dev, dtype=slots.a_val.dtype).contiguous())
        else:
            # packed (the compiled kernel's layout, so the library is there): one C pass over A
            done = native.pack_rows(w.A, slots.a_idx.dtype, slots.a_val.dtype) if slots.a_packed else None
            if done is not None:
                idx, vals, mask, p = done
            else:
                idx, vals, _ = compact_rows(w.A)  # padding stays (column 0, value 0.0)
                p = idx.shape[1]
                mask = _column_words(w.A) if slots.a_packed else None
            P = slots.a_idx.shape[-1]
            if p > P:
                raise ValueError(f"slice {i}: A rows hold up to {p} nonzeros, slots allow {P}")
            shape = (-1,) if slots.a_packed else tuple(idx.shape)  # packed: rows of p entries back to back
            a_idx.append(idx.to(slots.a_idx.dtype).reshape(shape).to(dev))
            a_val.append(vals.to(slots.a_val.dtype).reshape(shape).to(dev))
            a_mask.append(None if mask is None else mask.to(dev))
            nnz.append(p if slots.a_packed else 0)
            extent.append((w.A.shape[0], p))
        # Unscaled (the engine's B: vLLM folds alpha/r in), B^T stays a view of the caller's B, converted by
        # write_slot's copy: an image then costs no memory for B, only for the compacted A.
        bs.append((w.B.T if w.scaling == 1.0 else w.scaling * w.B.to(torch.float32).T).to(dev))
        ds.append(w.d.to(device=dev, dtype=torch.float32))
    ks, rs = tuple(w.top_k for w in adapters), tuple(w.A.shape[0] for w in adapters)
    magnitude = adapters[0].routing == "magnitude"
    as_int = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
    return SlotImage(layout=_layout(slots), a_idx=tuple(a_idx), a_val=tuple(a_val), a_mask=tuple(a_mask),
                     b=tuple(bs), d=tuple(ds), k=as_int(ks), r=as_int(rs), nnz=as_int(nnz),
                     host_meta=(ks, rs, magnitude), extent=tuple(extent))


def write_slot(slots: FlyLoRASlots, slot: int, image: SlotImage) -> None:
    """Copy ``image`` (:func:`prepare_slot` for a slot layout like ``slots``') into ``slot``, in place."""
    if not 0 <= slot < slots.num_slots:
        raise ValueError(f"slot must be in [0, {slots.num_slots}), got {slot}")
    if image.layout != _layout(slots):
        raise ValueError("the slot image was prepared for another slot layout")
    old = slots.host_extent[slot]
    if old is None or any(r0 > r1 or p0 > p1 for (r0, p0), (r1, p1) in zip(old, image.extent)):
        clear_slot(slots, slot)  # else every nonzero the slot may hold is overwritten below
    slots.host_extent[slot] = None  # until the copy is complete
    R = slots.max_rank
    for i in range(slots.num_slices):
        r = image.b[i].shape[0]
        rows = slice(i * R, i * R + r)
        if slots.a_idx is None:
            slots.a_val[slot, rows] = image.a_val[i]
        elif slots.a_packed:  # the slice's block starts at i*R*P; its rows are back to back from there
            start = i * R * slots.a_idx.shape[-1]
            block = slice(start, start + image.a_idx[i].numel())
            slots.a_idx[slot].view(-1)[block] = image.a_idx[i]
            slots.a_val[slot].view(-1)[block] = image.a_val[i]
            slots.a_mask[slot, rows] = image.a_mask[i]
        else:
            p = image.a_idx[i].shape[1]
            slots.a_idx[slot, rows, :p] = image.a_idx[i]
            slots.a_val[slot, rows, :p] = image.a_val[i]
        slots.b_view(i)[slot, :r] = image.b[i]
        slots.d[slot, rows] = image.d[i]
    slots.k[slot] = image.k
    slots.r[slot] = image.r
    if slots.a_nnz is not None:
        slots.a_nnz[slot] = image.nnz
    slots.magnitude[slot] = image.host_meta[2]
    slots.host_meta[slot] = image.host_meta
    slots.host_extent[slot] = image.extent


def load_slot(slots: FlyLoRASlots, slot: int, adapters: Sequence[LayerAdapter], *, check_finite: bool = True) -> None:
    """Copy one adapter's weights for every slice (``adapters[i]`` for slice ``i``) into ``slot``, in place.

    All slices must share the routing (it is per adapter). Raises ``ValueError`` on any size mismatch, and on
    non-finite weights (nothing is written then). The kernels rely on finite weights (the CPU block expand
    multiplies unselected ranks' B rows by zero). ``check_finite=False`` skips that scan for weights already
    known finite: the engine's, which the checkpoint validator checked on upload (a third of the time of an
    activation). Equivalent to :func:`write_slot` of :func:`prepare_slot`.
    """
    if not 0 <= slot < slots.num_slots:
        raise ValueError(f"slot must be in [0, {slots.num_slots}), got {slot}")
    write_slot(slots, slot, prepare_slot(slots, adapters, check_finite=check_finite))


def _column_words(A: torch.Tensor) -> torch.Tensor:
    """``[r, ceil(in/16)]`` int16 bitmasks of the entries :func:`compact_rows` keeps (nonzero raw bits)."""
    r, n_in = A.shape
    words = (n_in + 15) // 16
    bits = torch.zeros(r, words * 16, dtype=torch.int32)
    bits[:, :n_in] = (A.contiguous().view(_BITS_VIEW[A.dtype]) != 0).to(torch.int32)
    w = (bits.view(r, words, 16) << torch.arange(16, dtype=torch.int32)).sum(-1)
    return torch.where(w >= 32768, w - 65536, w).to(torch.int16)  # the same 16 bits, as int16


def build_slots(adapters: Sequence[Sequence[LayerAdapter]], *, num_slots: int | None = None,
                max_rank: int | None = None, compact: bool = False, **kwargs) -> FlyLoRASlots:
    """Allocate slots and load ``adapters[s]`` (one LayerAdapter per slice) into slot ``s``.

    ``compact=True`` stores A compact with ``P`` = the largest row count among the adapters. ``max_top_k``
    defaults to the largest ``top_k`` among them. Other keyword arguments go to :func:`allocate_slots`
    (``a_dtype``, ``b_dtype``, ``device``).
    """
    if not adapters:
        raise ValueError("need at least one adapter")
    first = adapters[0]
    max_rank = max_rank or max(w.A.shape[0] for ws in adapters for w in ws)
    max_nnz = max(int(compact_rows(w.A)[2].max()) for ws in adapters for w in ws) if compact else None
    if kwargs.get("packed") and not compact:
        raise ValueError("packed=True needs compact=True")
    kwargs.setdefault("max_top_k", max(w.top_k for ws in adapters for w in ws))
    slots = allocate_slots(num_slots or len(adapters), max_rank, first[0].A.shape[1],
                           [w.B.shape[0] for w in first], max_nnz=max_nnz, **kwargs)
    for s, ws in enumerate(adapters):
        load_slot(slots, s, ws)
    return slots


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


def _dense_a(slots: FlyLoRASlots) -> torch.Tensor:
    """``[S, n*R, in]`` fp32 dense A (a copy when stored compact)."""
    if slots.a_idx is None:
        return slots.a_val.float()
    S, nR, P = slots.a_val.shape
    a = torch.zeros(S, nR, slots.in_features, dtype=torch.float32, device=slots.device)
    if slots.a_packed:  # unpack each (slot, slice) block's rows of a_nnz[s, i] entries
        R = slots.max_rank
        for s in range(S):
            for i in range(slots.num_slices):
                m = int(slots.a_nnz[s, i])
                if m:
                    blk = slice(i * R * P, (i + 1) * R * P)
                    idx = slots.a_idx[s].view(-1)[blk][:R * m].view(R, m).long()
                    val = slots.a_val[s].view(-1)[blk][:R * m].view(R, m).float()
                    a[s, i * R:(i + 1) * R].scatter_add_(1, idx, val)
        return a
    return a.scatter_add_(2, slots.a_idx.long(), slots.a_val.float())


def apply_reference(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots: FlyLoRASlots) -> None:
    """The naive backend: a Python loop over tokens and slices with :func:`reference.select_ranks`."""
    a, R = _dense_a(slots), slots.max_rank
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


def _cpu_backend():
    from flylora_runtime.kernels.cpu import apply_cpu
    return apply_cpu


def _triton_backend():
    from flylora_runtime.kernels.triton_kernels import apply_triton
    return apply_triton


BACKENDS: dict[str, Callable[[], Callable]] = {
    "cpu": _cpu_backend, "triton": _triton_backend, "reference": lambda: apply_reference}


def get_backend(device: torch.device | str, name: str | None = None) -> Callable:
    """The backend for ``device``: ``name``, else ``$FLYLORA_KERNEL_BACKEND``, else triton on CUDA/ROCm
    (XPU too when triton supports it) and cpu elsewhere. Raises ``ValueError`` for an unknown name."""
    name = name or os.environ.get("FLYLORA_KERNEL_BACKEND") or (
        "cpu" if torch.device(device).type == "cpu" else "triton")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name]()


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
