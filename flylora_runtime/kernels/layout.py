"""The slot layout: per adapted layer, preallocated buffers that hold up to ``S`` adapters at once.

:class:`FlyLoRASlots` documents every buffer; :func:`allocate_slots` makes an empty set. Only
:mod:`.lifecycle` (load, prepare, write, clear) writes into slots, and every backend reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


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


def layout_key(slots: FlyLoRASlots) -> tuple:
    """What a :class:`~.lifecycle.SlotImage` must have been prepared for to be written into ``slots``."""
    return (slots.in_features, slots.output_slices, slots.max_rank, slots.max_top_k, slots.a_val.dtype,
            None if slots.a_idx is None else (slots.a_idx.dtype, slots.a_idx.shape[-1]), slots.a_packed,
            slots.b.dtype, slots.device)


def dense_a(slots: FlyLoRASlots) -> torch.Tensor:
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
