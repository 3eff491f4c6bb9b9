"""One adapter's layers at once: the images of all of them (:func:`prepare_slots`) and their writes into one slot
(:func:`plan_writes`, :func:`write_slots`), with a handful of C calls for the whole adapter instead of some per
layer. What an engine activation runs for an adapter read from its engine form; the slots and host mirrors are
bit for bit those of :func:`~.lifecycle.prepare_slot` and :func:`~.lifecycle.write_slot` layer by layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from flylora_runtime.kernels import native
from flylora_runtime.kernels.layout import FlyLoRASlots, layout_key
from flylora_runtime.kernels.lifecycle import (_ROUTING_FLAGS, SlotImage, _begin_write_extent, _can_defer,
                                               _contiguous_a, _copy_plan, _plan_buffers, prepare_slot, write_slot)
from flylora_runtime.reference.ops import LayerAdapter


def prepare_slots(jobs: Sequence[tuple[FlyLoRASlots, Sequence[LayerAdapter]]], *, check_finite: bool = True,
                  pack_at_write: bool = False) -> list[SlotImage]:
    """:func:`prepare_slot` of every ``(slots, adapters)`` in ``jobs`` (one adapter's layers), the same images,
    with the count passes of ``pack_at_write`` for every layer and slice in one C call
    (``flylora_cpu_count_many``) instead of one per slice. Raises as :func:`prepare_slot` does, for the first
    job that fails."""
    counted: list = [None] * len(jobs)
    if pack_at_write and native.library() is not None:
        rows, owners = [], []
        for j, (slots, adapters) in enumerate(jobs):
            if len(adapters) != slots.num_slices or not _can_defer(slots, adapters):
                continue  # prepare_slot refuses it or makes the image as usual
            srcs = _contiguous_a(adapters)
            if any(A.dim() != 2 for A in srcs):
                continue
            i_bytes = slots.a_idx.element_size()
            rows.extend(native.count_row(A, i_bytes, slots.a_val.dtype) for A in srcs)
            owners.append((j, srcs))
        if rows:
            counts = native.count_many(np.array(rows, dtype=np.int64).reshape(-1, native.COUNT_COLUMNS))
            at = 0
            for j, srcs in owners:
                counted[j] = (srcs, tuple(counts[at:at + len(srcs)]))
                at += len(srcs)
    images = []
    for (slots, adapters), c in zip(jobs, counted):
        image = None if c is None or check_finite else _fast_image(slots, adapters, c)
        images.append(image if image is not None else prepare_slot(
            slots, adapters, check_finite=check_finite, pack_at_write=pack_at_write, _counted=c))
    return images


#: ``(k, r, nnz)`` int32 rows by their values, shared by every image :func:`_fast_image` makes (never written: a
#: write copies from them); bounded, cleared when full (images keep their own references).
_META_ROWS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_MAX_META_ROWS = 4096


def _meta_rows(ks: tuple, rs: tuple, nnz: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (ks, rs, nnz)
    found = _META_ROWS.get(key)
    if found is None:
        if len(_META_ROWS) >= _MAX_META_ROWS:
            _META_ROWS.clear()
        found = _META_ROWS[key] = torch.tensor(key, dtype=torch.int32).unbind(0)
    return found


def _static(slots: FlyLoRASlots) -> dict:
    """What :func:`_fast_image` needs of ``slots`` that never changes (made once per slot set)."""
    found = getattr(slots, "_fast_static", None)
    if found is None:
        buffers = _plan_buffers(slots)
        S, R = slots.num_slots, slots.max_rank
        offs, off = [], 0
        for out_i in slots.output_slices:
            offs.append(off)
            off += out_i
        for name, dtype in (("k", torch.int32), ("r", torch.int32), ("a_nnz", torch.int32), ("magnitude", torch.bool)):
            assert name not in buffers or buffers[name][4] is dtype, name  # what _meta_rows and the flags hold
        _, b_ptr, _, b_size, b_dtype, _ = buffers[0]
        _, d_ptr, d_slot, d_size, _, _ = buffers["d"]
        found = {
            "layout": layout_key(slots),
            "b": [(b_ptr, R * out_i * b_size, S * R * o * b_size, out_i * b_size)
                  for out_i, o in zip(slots.output_slices, offs)],
            "b_dtype": b_dtype,
            "d": (d_ptr, d_slot * d_size, d_size),
            "meta": [(name, buffers[name][1], buffers[name][2] * buffers[name][3])
                     for name in ("k", "r", "magnitude", "a_nnz") if name in buffers],
        }
        slots._fast_static = found
    return found


def _fast_image(slots: FlyLoRASlots, adapters: Sequence[LayerAdapter], counted) -> SlotImage | None:
    """:func:`prepare_slot` (``pack_at_write``, no finiteness scan, counts made) and its copy plan, for the
    engine's case: each slice's ``B^T`` a contiguous view in the slots' dtype (the engine form's), ``d`` fp32,
    no scaling left to apply. The same image and plan, without the generic path's conversions and lookups (a
    cold full adapter's images and first write, offline: 18.5 -> 13.2 ms with :func:`write_slots`,
    ``python -m flylora_runtime.bench.load``). None when
    a slice is not of that case (the caller then uses :func:`prepare_slot`); raises as it does for what it
    refuses."""
    n = slots.num_slices
    if len(adapters) != n:
        return None
    st = _static(slots)
    R, n_in, P, top = slots.max_rank, slots.in_features, slots.a_idx.shape[-1], slots.max_top_k
    routing = adapters[0].routing
    srcs, ps = counted
    rows, sources, bs, ds, ks, rs, extent = [], [], [], [], [], [], []
    for i, w in enumerate(adapters):
        A, B, d = w.A, w.B, w.d
        bt = B.T
        if (w.scaling != 1.0 or w.routing != routing or d.dtype is not torch.float32 or not d.is_contiguous()
                or bt.dtype is not st["b_dtype"] or not bt.is_contiguous() or B.device.type != "cpu"
                or d.device.type != "cpu"):
            return None
        r = A.shape[0]
        out_i = slots.output_slices[i]
        if A.shape != (r, n_in) or B.shape != (out_i, r) or d.shape != (r,):
            raise ValueError(f"slice {i}: expected A [r, {n_in}], B [{out_i}, r], d [r], got "
                             f"{tuple(A.shape)}, {tuple(B.shape)}, {tuple(d.shape)}")
        if r > R or not 0 < w.top_k <= min(r, top):
            raise ValueError(f"slice {i}: need r <= {R} and 0 < top_k <= min(r, {top}), got r={r}, top_k={w.top_k}")
        p = ps[i]
        if not 0 <= p <= P:
            raise ValueError(f"slice {i}: A rows hold up to {p} nonzeros, slots allow {P}")
        b_ptr, b_slot, b_off, b_row = st["b"][i]
        d_ptr, d_slot, d_size = st["d"]
        rows.append((b_ptr, b_slot, b_off, bt.data_ptr(), r * b_row))
        rows.append((d_ptr, d_slot, i * R * d_size, d.data_ptr(), r * d_size))
        bs.append(bt), ds.append(d), ks.append(w.top_k), rs.append(r), extent.append((r, p))
    ks, rs, ps = tuple(ks), tuple(rs), tuple(ps)
    k_t, r_t, nnz_t = _meta_rows(ks, rs, ps)
    magnitude = routing == "magnitude"
    meta_src = {"k": k_t, "r": r_t, "magnitude": _ROUTING_FLAGS[magnitude], "a_nnz": nnz_t}
    for name, ptr, nbytes in st["meta"]:
        src = meta_src[name]
        rows.append((ptr, nbytes, 0, src.data_ptr(), nbytes))
    sources.extend(bs), sources.extend(ds), sources.extend(meta_src.values())
    image = SlotImage(layout=st["layout"], a_idx=(None,) * n, a_val=(None,) * n, a_mask=(None,) * n, b=tuple(bs),
                      d=tuple(ds), k=k_t, r=r_t, nnz=nnz_t, host_meta=(ks, rs, magnitude), extent=tuple(extent),
                      a_src=tuple(srcs))
    object.__setattr__(image, "_plan", (slots, np.array(rows, dtype=np.int64).reshape(-1, 5), [], sources))
    return image


@dataclass(frozen=True)
class WritePlan:
    """How :func:`write_slots` writes one adapter's images into many slot sets (a model's layers) with two C
    calls: every layer's :func:`_copy_plan` table in one (``flylora_cpu_copy_pieces``), and every slice's A
    packed by one ``flylora_cpu_pack_many``. Made by :func:`plan_writes`, valid for those exact pairs (it holds
    the slots and images, so their buffers outlive it), for any slot index."""

    pairs: tuple[tuple[FlyLoRASlots, SlotImage], ...]
    copy_table: np.ndarray
    leftovers: tuple
    pack_table: np.ndarray

    def matches(self, pairs: Sequence[tuple[FlyLoRASlots, SlotImage]]) -> bool:
        """Whether this plan was made for exactly these slot sets and images (by identity)."""
        return len(self.pairs) == len(pairs) and all(
            a is c and b is d for (a, b), (c, d) in zip(self.pairs, pairs))


def plan_writes(pairs: Sequence[tuple[FlyLoRASlots, SlotImage]]) -> WritePlan | None:
    """The :class:`WritePlan` of ``pairs``; None when one of them has no compiled copy plan (see
    :func:`_copy_plan`: off the CPU, no library, unpacked compact A). Checks the layouts as
    :func:`write_slot` does."""
    if len({id(slots) for slots, _ in pairs}) != len(pairs):
        raise ValueError("each slot set may appear once in a write plan")
    copies, leftovers, packs = [], [], []
    for slots, image in pairs:
        if image.layout != layout_key(slots):
            raise ValueError("the slot image was prepared for another slot layout")
        plan = _copy_plan(slots, image)
        if plan is None:
            return None
        copies.append(plan[1])
        leftovers.extend(plan[2])
        if image.a_src is not None:
            R, P, W = slots.max_rank, slots.a_idx.shape[-1], slots.a_mask.shape[-1]
            i_bytes, v_bytes = slots.a_idx.element_size(), slots.a_val.element_size()
            idx_slot, val_slot = slots.a_idx[0].numel() * i_bytes, slots.a_val[0].numel() * v_bytes
            mask_slot = slots.a_mask[0].numel() * 2
            for i, (A, (r, p)) in enumerate(zip(image.a_src, image.extent)):
                if not (A.is_contiguous() and A.dim() == 2 and A.shape == (r, slots.in_features)
                        and r <= R and 0 <= p <= P):
                    raise AssertionError("a packed slice does not fit its slot block")
                packs.append((A.data_ptr(), native.DTYPE_CODES[A.dtype], r, A.shape[1], p,
                              slots.a_idx.data_ptr() + i * R * P * i_bytes, idx_slot, i_bytes,
                              slots.a_val.data_ptr() + i * R * P * v_bytes, val_slot,
                              native.DTYPE_CODES[slots.a_val.dtype],
                              slots.a_mask.data_ptr() + i * R * W * 2, mask_slot))
    return WritePlan(pairs=tuple(pairs), copy_table=np.concatenate(copies) if copies else np.zeros((0, 5), np.int64),
                     leftovers=tuple(leftovers),
                     pack_table=np.array(packs, dtype=np.int64).reshape(-1, native.PACK_COLUMNS))


def write_slots(pairs: Sequence[tuple[FlyLoRASlots, SlotImage]], slot: int,
                plan: WritePlan | None = None) -> WritePlan | None:
    """:func:`write_slot` of every ``(slots, image)`` in ``pairs`` into slot ``slot`` (one adapter's layers),
    with the same result, in two C calls for all of them. ``plan``: a :func:`plan_writes` of these same pairs
    kept from an earlier call (one is made otherwise); returned for the next call, None when the pairs are
    written one by one (no compiled plan)."""
    if plan is not None and not plan.matches(pairs):
        raise ValueError("the write plan was made for other slots or images")
    check_slot([slots for slots, _ in pairs], slot)
    if plan is None:
        plan = plan_writes(pairs)
        if plan is None:
            for slots, image in pairs:
                write_slot(slots, slot, image)
            return None
    write_tables([(slots, image.host_meta, image.extent) for slots, image in pairs], plan.copy_table,
                 plan.pack_table, slot, plan.leftovers)
    return plan


def check_slot(slot_sets: Sequence[FlyLoRASlots], slot: int) -> None:
    """``ValueError`` unless ``slot`` is a slot of every slot set."""
    for slots in slot_sets:
        if not 0 <= slot < slots.num_slots:
            raise ValueError(f"slot must be in [0, {slots.num_slots}), got {slot}")


def write_tables(targets: Sequence[tuple[FlyLoRASlots, tuple, tuple]], copy_table: np.ndarray, pack_table: np.ndarray,
                 slot: int, leftovers: Sequence = ()) -> None:
    """Write one adapter into ``slot`` of its slot sets from its tables: ``targets`` is per slot set ``(slots, host
    meta, extent)`` of the adapter, ``copy_table`` and ``pack_table`` the rows of ``flylora_cpu_copy_pieces`` and
    ``flylora_cpu_pack_many`` (checked by whoever built them, sources alive for the call), ``leftovers`` the pieces
    torch copies. Each slot is cleared first where the adapter does not cover what it held, marked unknown until
    the write is complete, then given the adapter's host mirrors. What :func:`write_slots` and
    :meth:`~.adapter_template.AdapterWrite.write` run."""
    for slots, _, extent in targets:
        _begin_write_extent(slots, slot, extent)
    native.copy_pieces(copy_table, slot)
    for dst, src in leftovers:
        dst(slot).copy_(src)
    if pack_table.shape[0]:
        done = native.pack_many(pack_table, slot)
        if done != pack_table.shape[0]:
            raise RuntimeError(f"flylora_cpu_pack_many stopped at slice {done} of {pack_table.shape[0]}")
    for slots, meta, extent in targets:
        slots.host_meta[slot] = meta
        slots.host_extent[slot] = extent
