"""One write plan for every adapter of a shape: an adapter's whole write (:class:`~.adapter_write.WritePlan`) with
the addresses that point into its own file made relative to the file's start (:class:`AdapterTemplate`).

Every adapter the gateway stores with an engine form of one layout (the same tensors, dtypes and shapes at the
same offsets of the file: :mod:`flylora_runtime.format.engine_form`) and the same top-k and routing is written into
a slot by the same copies and packs; only two things differ: where its file is mapped, and how many entries its
A's rows hold (the packed rows' width ``p`` of each slice, which is in the slot's ``a_nnz`` and sizes the pack).
So a cold adapter of a shape already seen needs none of the 120 slot images and their copy plans
(:func:`~.adapter_write.prepare_slots`, :func:`~.adapter_write.plan_writes`: Python per layer and slice, most of a
cold load's time): :meth:`AdapterTemplate.instantiate` counts its A (one C call), checks the counts against the
slots' room, and rebases the template's tables on its mapping (numpy), and :meth:`AdapterWrite.write` writes it
(two C calls). The slots are bit for bit what the images and :func:`~.adapter_write.write_slots` give
(``tests/kernels/test_adapter_template.py``).

What is not in the file is the same for every adapter of the template, or the template refuses to be made
(:meth:`AdapterTemplate.from_plan` returns None): the slot meta rows ``k``, ``r`` and ``magnitude`` (set by the
layout, the top-k and the routing, which the caller keys templates by) and the all-zero placeholders of slices the
adapter does not target. Those sources are kept alive by the template.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from flylora_runtime.kernels import native
from flylora_runtime.kernels.adapter_write import WritePlan, check_slot, write_tables
from flylora_runtime.kernels.layout import FlyLoRASlots
from flylora_runtime.kernels.lifecycle import _plan_buffers

# Columns of the tables (flylora_cpu_copy_pieces, flylora_cpu_pack_many, flylora_cpu_count_many).
_COPY_DST, _COPY_SRC = 0, 3
_PACK_SRC, _PACK_P = 0, 4
_PACK_TO_COUNT = [0, 1, 2, 3, 7, 10]  # a pack row's (A, dtype, r, in, index bytes, value dtype): its count row
_CONSTANT_META = ("k", "r", "magnitude")


def _zeros_at(ptr: int, nbytes: int) -> bool:
    """Whether the ``nbytes`` bytes at ``ptr`` (memory the caller keeps alive) are all zero."""
    return nbytes == 0 or not np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=np.uint8).any()


@dataclass(frozen=True)
class AdapterTemplate:
    """The whole write of one adapter, relative to its file (see the module docstring). Made by :meth:`from_plan`;
    holds its slot sets, so their buffers outlive it."""

    slots: tuple[FlyLoRASlots, ...]  # the slot sets written, in the plan's order
    size: int  # bytes of the file mapping the relative addresses are within
    count_table: np.ndarray  # [m, 6] flylora_cpu_count_many rows, one per packed slice, A relative where in_pack
    room: np.ndarray  # [m] the most entries a row of each packed slice may hold (the slots' P)
    copy_table: np.ndarray  # [c, 5] flylora_cpu_copy_pieces rows; sources relative where copy_in_file
    copy_in_file: np.ndarray  # [c] bool
    nnz_rows: np.ndarray  # [n_slot_sets] the copy rows that write a_nnz, one per slot set
    pack_table: np.ndarray  # [m, 13] flylora_cpu_pack_many rows; A relative where in_pack, p filled per adapter
    in_pack: np.ndarray  # [m] bool: the slice's A is in the file (else a kept placeholder)
    first: tuple[int, ...]  # per slot set: its first packed slice (its slices are first .. first + num_slices)
    ranks: tuple[tuple[int, ...], ...]  # per slot set: r of each slice
    host_meta: tuple  # per slot set: FlyLoRASlots.host_meta of the adapter
    sources: tuple  # what the absolute sources point into

    @classmethod
    def from_plan(cls, plan: WritePlan, mapping: torch.Tensor) -> AdapterTemplate | None:
        """The template of ``plan`` (:func:`~.adapter_write.plan_writes` of one adapter's images, made with
        ``pack_at_write`` from tensors that are views of ``mapping``, the adapter's whole file as a uint8 CPU
        tensor); None when the plan has something a template cannot rebase (a torch leftover, an image with its A
        already packed, a source outside the file that is neither a meta row nor zeros). What lies in the file is
        decided by address: inside ``mapping``'s bytes."""
        if plan.leftovers or mapping.dtype != torch.uint8 or mapping.dim() != 1 or not mapping.is_contiguous():
            return None
        lo, size = mapping.data_ptr(), mapping.numel()

        def in_file(ptr, nbytes):
            return (ptr >= lo) & (ptr + nbytes <= lo + size)

        pack = plan.pack_table.copy()
        if pack.shape[0] == 0:
            return None

        def of_file(t: torch.Tensor) -> bool:
            return bool(in_file(t.data_ptr(), t.numel() * t.element_size()))

        in_pack, first, ranks, host_meta, sources, at = [], [], [], [], [], 0
        for slots, image in plan.pairs:
            n = slots.num_slices
            if image.a_src is None or len(image.a_src) != n:
                return None
            # the pack rows of this slot set: its n slices, in order, into its own A blocks
            if at + n > pack.shape[0] or not all(pack[at + i, _PACK_SRC] == a.data_ptr()
                                                 for i, a in enumerate(image.a_src)):
                return None
            first.append(at)
            ranks.append(tuple(r for r, _ in image.extent))
            host_meta.append(image.host_meta)
            in_pack.extend(of_file(a) for a in image.a_src)
            sources.extend(image.a_src)
            sources.extend(image._plan[3])  # what its copy rows read (made by plan_writes)
            at += n
        if at != pack.shape[0]:
            return None
        in_pack = np.array(in_pack, dtype=bool)
        copy = plan.copy_table.copy()
        copy_in_file = in_file(copy[:, _COPY_SRC], copy[:, 4])
        nnz_rows = []
        row = 0
        for slots, image in plan.pairs:
            names = {v[1]: k for k, v in _plan_buffers(slots).items() if isinstance(k, str)}
            rows = image._plan[1]
            if not np.array_equal(copy[row:row + rows.shape[0]], rows):
                return None  # not the concatenation of the images' plans
            nnz = None
            for i in range(row, row + rows.shape[0]):
                if copy_in_file[i]:
                    continue
                name = names.get(int(copy[i, _COPY_DST]))
                if name == "a_nnz":
                    if nnz is not None or copy[i, 4] != 4 * slots.num_slices:
                        return None
                    nnz = i
                elif name not in _CONSTANT_META and not _zeros_at(int(copy[i, _COPY_SRC]), int(copy[i, 4])):
                    return None  # an adapter-dependent value that is not in the file
            if nnz is None:
                return None
            nnz_rows.append(nnz)
            row += rows.shape[0]
        if row != copy.shape[0]:
            return None
        copy[copy_in_file, _COPY_SRC] -= lo
        pack[in_pack, _PACK_SRC] -= lo
        pack[:, _PACK_P] = 0
        count = pack[:, _PACK_TO_COUNT].copy()
        room = np.array([slots.a_idx.shape[-1] for slots, _ in plan.pairs for _ in range(slots.num_slices)],
                        dtype=np.int64)
        # The sources outside the file stay alive with the template; the file's own views are the adapter's.
        kept = tuple({id(t): t for t in sources if not of_file(t)}.values())
        return cls(slots=tuple(s for s, _ in plan.pairs), size=size, count_table=count, room=room, copy_table=copy,
                   copy_in_file=copy_in_file, nnz_rows=np.array(nnz_rows, dtype=np.int64), pack_table=pack,
                   in_pack=in_pack, first=tuple(first), ranks=tuple(ranks), host_meta=tuple(host_meta), sources=kept)

    def instantiate(self, mapping: torch.Tensor) -> AdapterWrite:
        """The write of the adapter whose file is ``mapping`` (a uint8 CPU tensor of :attr:`size` bytes, the same
        layout as the template's adapter): its A counted (one C call) and checked against the slots' room, the
        tables rebased on it. Raises ``ValueError`` as :func:`~.lifecycle.prepare_slot` does for rows with more
        entries than the slots hold; nothing is written."""
        if (mapping.dtype != torch.uint8 or mapping.dim() != 1 or not mapping.is_contiguous()
                or mapping.device.type != "cpu" or mapping.numel() != self.size):
            raise ValueError(f"expected the adapter's file as {self.size} contiguous uint8 bytes on the CPU")
        base = mapping.data_ptr()
        counts = self.count_table.copy()
        counts[self.in_pack, 0] += base
        p = np.array(native.count_many(counts), dtype=np.int64)
        bad = np.flatnonzero((p < 0) | (p > self.room))
        if bad.size:
            i = int(bad[0])
            j = int(np.searchsorted(np.array(self.first), i, side="right")) - 1  # its slot set, in write order
            raise ValueError(f"layer {j} of {len(self.slots)}, slice {i - self.first[j]}: A rows hold up to "
                             f"{int(p[i])} nonzeros, slots allow {int(self.room[i])}")
        nnz = p.astype(np.int32)
        copy = self.copy_table.copy()
        copy[self.copy_in_file, _COPY_SRC] += base
        copy[self.nnz_rows, _COPY_SRC] = nnz.ctypes.data + 4 * np.array(self.first, dtype=np.int64)
        pack = self.pack_table.copy()
        pack[self.in_pack, _PACK_SRC] += base
        pack[:, _PACK_P] = p
        widths = p.tolist()
        extents = tuple(tuple(zip(ranks, widths[f:f + len(ranks)])) for f, ranks in zip(self.first, self.ranks))
        return AdapterWrite(template=self, copy_table=copy, pack_table=pack, extents=extents, keep=(mapping, nnz))


@dataclass(frozen=True)
class AdapterWrite:
    """One adapter's whole write, made by :meth:`AdapterTemplate.instantiate`: what :func:`~.adapter_write.
    write_slots` does with the adapter's images and plan, into any slot, with the same result."""

    template: AdapterTemplate
    copy_table: np.ndarray
    pack_table: np.ndarray
    extents: tuple  # per slot set: FlyLoRASlots.host_extent of the adapter
    keep: tuple  # the mapping and the a_nnz values the tables point into

    def write(self, slot: int) -> None:
        """Write the adapter into slot ``slot`` of every slot set of the template."""
        t = self.template
        check_slot(t.slots, slot)
        write_tables(list(zip(t.slots, t.host_meta, self.extents)), self.copy_table, self.pack_table, slot)
