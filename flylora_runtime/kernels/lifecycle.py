"""Slot lifecycle: an adapter into a slot (prepare, write, load), out of it (clear), and whole slot sets for
tests and benchmarks (build).

A hot swap is :func:`prepare_slot` (compaction, bitmasks: the slow part, done once per adapter and layer,
by the compiled kernel's one C pass when it is there) and :func:`write_slot` (a few copies; with
``pack_at_write`` the C pass that packs A runs at each write instead, straight into the slot). The host
mirrors :attr:`FlyLoRASlots.host_meta` and :attr:`FlyLoRASlots.host_extent` are kept here, so change slots
only through these functions (or :mod:`.adapter_write`, which writes a whole adapter's layers at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from flylora_runtime.kernels import native
from flylora_runtime.kernels.layout import FlyLoRASlots, allocate_slots, layout_key
from flylora_runtime.reference.ops import LayerAdapter
from flylora_runtime.weights.packing import column_words, compact_rows


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
    it was made for.

    An image made with ``pack_at_write=True`` (:func:`prepare_slot`; packed CPU slots with the compiled
    library) holds no packed A: ``a_src`` keeps each slice's A as it is (the adapter's own tensor, a view of
    its engine form in the engine), its rows' entry counts are known (``extent``, ``nnz``), and every
    :func:`write_slot` packs A straight into the slot in one C pass per slice (the same bytes the packed
    image would have copied). A cold adapter's first activation then makes no packed copy of A (fresh
    pages: most of a full adapter's image time in the engine), and a cached adapter costs no memory for it.
    ``a_idx``, ``a_val`` and ``a_mask`` are then all ``None``."""

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
    a_src: tuple[torch.Tensor, ...] | None = None  # per slice: A [r, in], contiguous, packed by write_slot


def prepare_slot(slots: FlyLoRASlots, adapters: Sequence[LayerAdapter], *, check_finite: bool = True,
                 pack_at_write: bool = False, _counted=None) -> SlotImage:
    """One adapter's weights for every slice (``adapters[i]`` for slice ``i``), converted to ``slots``'
    layout (nothing is written to ``slots``). Raises ``ValueError`` as :func:`load_slot` does.

    ``pack_at_write=True``: A is only counted here (its rows' entries, checked against the slots' room) and
    packed by each :func:`write_slot` (see :class:`SlotImage`); where that is not possible (not packed CPU
    slots, no compiled library, an A dtype it does not read) the image is made as without it."""
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
    dev = slots.device
    on_cpu = dev.type == "cpu"
    idx_dtype = None if slots.a_idx is None else slots.a_idx.dtype
    val_dtype = slots.a_val.dtype

    def placed(t: torch.Tensor, dtype: torch.dtype | None = None, shape=None) -> torch.Tensor:
        """``t`` in ``dtype``, ``shape`` and on the slots' device (no call at all when it already is: this
        runs for every slice of every layer at an adapter's first activation)."""
        if dtype is not None and t.dtype is not dtype:
            t = t.to(dtype)
        if shape is not None and tuple(t.shape) != shape:
            t = t.reshape(shape)
        return t if on_cpu and t.device.type == "cpu" else t.to(dev)

    a_idx, a_val, a_mask, bs, ds, nnz, extent = [], [], [], [], [], [], []
    a_src = _deferred_a(slots, adapters, _counted) if pack_at_write else None
    for i, w in enumerate(adapters):
        if a_src is not None:  # counted by _deferred_a; packed by write_slot
            p = a_src[1][i]
            a_idx.append(None), a_val.append(None), a_mask.append(None), nnz.append(p), extent.append((w.A.shape[0], p))
        elif idx_dtype is None:
            a_idx.append(None), a_mask.append(None), nnz.append(0), extent.append((w.A.shape[0], 0))
            a_val.append(placed(w.A, val_dtype).contiguous())
        else:
            # packed (the compiled kernel's layout, so the library is there): one C pass over A
            done = native.pack_rows(w.A, idx_dtype, val_dtype) if slots.a_packed else None
            if done is not None:
                idx, vals, mask, p = done
            else:
                idx, vals, _ = compact_rows(w.A)  # padding stays (column 0, value 0.0)
                p = idx.shape[1]
                mask = column_words(w.A) if slots.a_packed else None
            P = slots.a_idx.shape[-1]
            if p > P:
                raise ValueError(f"slice {i}: A rows hold up to {p} nonzeros, slots allow {P}")
            shape = (idx.numel(),) if slots.a_packed else tuple(idx.shape)  # packed: rows of p entries back to back
            a_idx.append(placed(idx, idx_dtype, shape))
            a_val.append(placed(vals, val_dtype, shape))
            a_mask.append(None if mask is None else placed(mask))
            nnz.append(p if slots.a_packed else 0)
            extent.append((w.A.shape[0], p))
        # Unscaled (the engine's B: vLLM folds alpha/r in), B^T stays a view of the caller's B, converted by
        # write_slot's copy: an image then costs no memory for B, only for the compacted A.
        bs.append(placed(w.B.T if w.scaling == 1.0 else w.scaling * w.B.to(torch.float32).T))
        ds.append(placed(w.d, torch.float32))
    ks, rs = tuple(w.top_k for w in adapters), tuple(w.A.shape[0] for w in adapters)
    magnitude = adapters[0].routing == "magnitude"
    k, r, nnz = torch.tensor((ks, rs, tuple(nnz)), dtype=torch.int32, device=dev).unbind(0)  # one tensor, three rows
    return SlotImage(layout=layout_key(slots), a_idx=tuple(a_idx), a_val=tuple(a_val), a_mask=tuple(a_mask),
                     b=tuple(bs), d=tuple(ds), k=k, r=r, nnz=nnz,
                     host_meta=(ks, rs, magnitude), extent=tuple(extent),
                     a_src=None if a_src is None else a_src[0])


def _can_defer(slots: FlyLoRASlots, adapters: Sequence[LayerAdapter]) -> bool:
    """Whether ``prepare_slot(pack_at_write=True)`` can leave A to be packed at each write."""
    return (native.library() is not None and slots.a_packed and slots.device.type == "cpu"
            and slots.a_val.dtype in native.DTYPE_CODES
            and all(w.A.dtype in native.DTYPE_CODES and w.A.device.type == "cpu" for w in adapters))


def _deferred_a(slots: FlyLoRASlots, adapters: Sequence[LayerAdapter], counted=None):
    """For ``prepare_slot(pack_at_write=True)``: ``(A per slice, contiguous; entries per row per slice)``, the
    counts made by the compiled library's count pass and checked against the slots' room; None when A cannot
    be packed at write (the image is then made as usual). ``counted``: the same pair made already by
    :func:`prepare_slots` (one count pass for many layers), only checked here."""
    if counted is None:
        if not _can_defer(slots, adapters):
            return None
        i_bytes = slots.a_idx.element_size()
        srcs = _contiguous_a(adapters)
        counted = srcs, tuple(native.count_rows(A, i_bytes, slots.a_val.dtype) for A in srcs)
    P = slots.a_idx.shape[-1]
    for i, p in enumerate(counted[1]):
        if not 0 <= p <= P:
            raise ValueError(f"slice {i}: A rows hold up to {p} nonzeros, slots allow {P}")
    return counted


def _pack_into_slot(slots: FlyLoRASlots, slot: int, image: SlotImage) -> None:
    """Pack ``image``'s A (``a_src``) straight into ``slot``: slice ``i``'s rows of ``p`` entries from the start
    of its block, and its rows' column words, as :func:`_copy_plan` would copy a packed image's."""
    R, P, W = slots.max_rank, slots.a_idx.shape[-1], slots.a_mask.shape[-1]
    i_bytes, v_bytes = slots.a_idx.element_size(), slots.a_val.element_size()
    idx0 = slots.a_idx.data_ptr() + slot * slots.a_idx[0].numel() * i_bytes
    val0 = slots.a_val.data_ptr() + slot * slots.a_val[0].numel() * v_bytes
    mask0 = slots.a_mask.data_ptr() + slot * slots.a_mask[0].numel() * 2
    for i, (A, (_, p)) in enumerate(zip(image.a_src, image.extent)):
        rc = native.pack_rows_at(A, p, idx0 + i * R * P * i_bytes, i_bytes, val0 + i * R * P * v_bytes,
                                 slots.a_val.dtype, mask0 + i * R * W * 2)
        if rc != p:
            raise RuntimeError(f"flylora_cpu_pack_rows returned {rc} for slice {i} (expected {p} entries per row)")


def _begin_write(slots: FlyLoRASlots, slot: int, image: SlotImage) -> None:
    """Before ``image`` is copied into ``slot``: clear the slot unless the image overwrites every nonzero it may
    hold (``host_extent``), and mark its contents unknown until the copy is complete."""
    _begin_write_extent(slots, slot, image.extent)


def _begin_write_extent(slots: FlyLoRASlots, slot: int, extent: tuple[tuple[int, int], ...]) -> None:
    """:func:`_begin_write` for a write of ``extent`` (per slice ``(r, p)``)."""
    old = slots.host_extent[slot]
    if old is None or any(r0 > r1 or p0 > p1 for (r0, p0), (r1, p1) in zip(old, extent)):
        clear_slot(slots, slot)
    slots.host_extent[slot] = None


def _contiguous_a(adapters: Sequence[LayerAdapter]) -> tuple[torch.Tensor, ...]:
    """Each slice's A as ``flylora_cpu_pack_rows`` reads it: contiguous (a copy only when it is not)."""
    return tuple(w.A if w.A.is_contiguous() else w.A.contiguous() for w in adapters)


def write_slot(slots: FlyLoRASlots, slot: int, image: SlotImage) -> None:
    """Copy ``image`` (:func:`prepare_slot` for a slot layout like ``slots``') into ``slot``, in place."""
    if not 0 <= slot < slots.num_slots:
        raise ValueError(f"slot must be in [0, {slots.num_slots}), got {slot}")
    if image.layout != layout_key(slots):
        raise ValueError("the slot image was prepared for another slot layout")
    _begin_write(slots, slot, image)
    plan = _copy_plan(slots, image)
    if plan is not None:
        native.copy_pieces(plan[1], slot)
        for dst, src in plan[2]:  # pieces that are not one contiguous run (a transposed B), if any
            dst(slot).copy_(src)
        if image.a_src is not None:
            _pack_into_slot(slots, slot, image)
    else:
        _write_with_torch(slots, slot, image)
    slots.host_meta[slot] = image.host_meta
    slots.host_extent[slot] = image.extent


def _write_with_torch(slots: FlyLoRASlots, slot: int, image: SlotImage) -> None:
    R = slots.max_rank
    for i in range(slots.num_slices):
        r = image.b[i].shape[0]
        rows = slice(i * R, i * R + r)
        if image.a_src is not None:
            pass  # packed below
        elif slots.a_idx is None:
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
    if image.a_src is not None:
        _pack_into_slot(slots, slot, image)


#: The two values of a slot's ``magnitude`` flag, as the one-element tensors a copy plan's table points into
#: (shared by every plan, never written).
_ROUTING_FLAGS = {False: torch.zeros(1, dtype=torch.bool), True: torch.ones(1, dtype=torch.bool)}


def _copy_plan(slots: FlyLoRASlots, image: SlotImage):
    """How :func:`write_slot` copies ``image`` into any slot of ``slots`` with the compiled library: ``(slots,
    table, leftovers, sources)``, made at the image's first write and kept on it (both are fixed: slots'
    buffers never move, an image never changes; the plan holds ``slots`` itself, so the buffers its table
    points into outlive it and another slot set can never match it by a reused ``id``). ``table`` rows are ``flylora_cpu_copy_pieces``'s (buffer,
    bytes per slot, offset, source, bytes), each destination range checked to lie inside its buffer for every
    slot; ``leftovers`` are ``(destination view of a slot, source)`` pairs for sources that are not one
    contiguous run of the buffer's dtype (torch copies those); ``sources`` keeps alive what the table points
    into. None (then torch copies everything) off the CPU, without the library, or for unpacked compact A
    (rows of ``p`` of ``P`` entries: not one run)."""
    cached = getattr(image, "_plan", None)
    if cached is not None and cached[0] is slots:
        return cached
    if slots.device.type != "cpu" or native.library() is None or (slots.a_idx is not None and not slots.a_packed):
        return None
    buffers = _plan_buffers(slots)
    S, R, n = slots.num_slots, slots.max_rank, slots.num_slices
    rows, leftovers, sources = [], [], []
    out_off = 0
    for i in range(n):
        out_i, r = slots.output_slices[i], image.b[i].shape[0]
        if slots.a_idx is None:  # dense A: the slice's first r rows
            pieces = [("a_val", i * R * slots.a_val.shape[-1], image.a_val[i])]
        elif image.a_src is not None:  # A is packed straight into the slot (_pack_into_slot)
            pieces = []
        else:  # packed: r * p entries back to back from the slice's block, and r rows of column words
            P, W = slots.a_idx.shape[-1], slots.a_mask.shape[-1]
            pieces = [("a_idx", i * R * P, image.a_idx[i]), ("a_val", i * R * P, image.a_val[i]),
                      ("a_mask", i * R * W, image.a_mask[i])]
        pieces += [(i, S * R * out_off, image.b[i]), ("d", i * R, image.d[i])]
        out_off += out_i
        for name, offset, src in pieces:
            buf, ptr, per_slot, size, dtype, numel = buffers[name]
            if src.dtype is not dtype or not src.is_contiguous():
                leftovers.append((_destination(slots, name, offset, src), src))
                continue
            count = src.numel()
            if offset + (S - 1) * per_slot + count > numel:
                raise AssertionError("a slot image piece falls outside its slot buffer")
            sources.append(src)
            rows.append((ptr, per_slot * size, offset * size, src.data_ptr(), count * size))
    magnitude = _ROUTING_FLAGS[bool(image.host_meta[2])]
    for name, src in (("k", image.k), ("r", image.r), ("magnitude", magnitude), ("a_nnz", image.nnz)):
        if name in buffers:
            buf, ptr, per_slot, size, dtype, numel = buffers[name]
            assert src.dtype is dtype and src.is_contiguous() and src.numel() == per_slot
            sources.append(src)
            rows.append((ptr, per_slot * size, 0, src.data_ptr(), per_slot * size))
    plan = (slots, np.array(rows, dtype=np.int64).reshape(-1, 5), leftovers, sources)
    object.__setattr__(image, "_plan", plan)
    return plan


def _plan_buffers(slots: FlyLoRASlots) -> dict:
    """Per destination of a slot image (a buffer name, or a slice's index for its block of ``b``): (buffer,
    address, elements per slot, element size, dtype, elements in all), made once per slots."""
    found = getattr(slots, "_plan_buffers", None)
    if found is None:
        R = slots.max_rank
        found = {}
        for name in ("a_val", "a_idx", "a_mask", "d", "k", "r", "magnitude", "a_nnz"):
            t = getattr(slots, name)
            if t is not None:
                found[name] = (t, t.data_ptr(), t[0].numel(), t.element_size(), t.dtype, t.numel())
        for i, out_i in enumerate(slots.output_slices):
            found[i] = (slots.b, slots.b.data_ptr(), R * out_i, slots.b.element_size(), slots.b.dtype, slots.b.numel())
        slots._plan_buffers = found
    return found


def _destination(slots: FlyLoRASlots, name, offset: int, src: torch.Tensor):
    """``slot -> the view of slot``'s part of buffer ``name`` that a source shaped like ``src`` fills from
    element ``offset`` of the slot (for the pieces torch copies)."""
    if isinstance(name, int):  # slice ``name``'s B^T rows
        return lambda s: slots.b_view(name)[s, :src.shape[0]]
    return lambda s: getattr(slots, name)[s].view(-1)[offset:offset + src.numel()].view(src.shape)


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
