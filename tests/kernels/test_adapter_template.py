"""AdapterTemplate (flylora_runtime.kernels.adapter_template): a whole adapter's write made relative to its file,
rebased on another adapter's file of the same layout, leaves every slot bit for bit as that adapter's own slot
images and write plan do (prepare_slots + write_slots, what the engine ran for every cold adapter before)."""

from __future__ import annotations

import pytest
import torch

from flylora_runtime.kernels import allocate_slots, load_slot, native, plan_writes, prepare_slots, write_slots
from flylora_runtime.kernels.adapter_template import AdapterTemplate
from flylora_runtime.reference.ops import LayerAdapter
from tests.kernels.cases import make_adapter
from tests.kernels.test_slots import _slot_buffers

pytestmark = pytest.mark.skipif(native.library() is None, reason="needs the compiled CPU kernel")

# (in, outs, targeted slices): the last layer's middle slice has no weights (a q/v adapter's k_proj)
SHAPES = [(64, (32, 16), (0, 1)), (48, (24,), (0,)), (64, (32, 16, 8), (0, 2))]
LAYOUT = {"packed": True, "index_dtype": torch.int16, "a_dtype": torch.bfloat16}


def _file(layers: list[list[LayerAdapter | None]]) -> tuple[torch.Tensor, list[list[LayerAdapter]]]:
    """One adapter as the engine holds one read from its engine form: every tensor a view of one uint8 mapping (bf16
    A, a transposed view of bf16 ``B^T`` with the scaling folded in, fp32 d, at offsets set by the shapes alone),
    and the zero rank-1 placeholder ``flylora_slice_adapters`` makes for a slice without weights (B in the slots'
    dtype)."""
    pieces = []
    for per in layers:
        for w in per:
            if w is not None:
                pieces += [w.A.to(torch.bfloat16), (w.scaling * w.B.T).to(torch.bfloat16).contiguous(), w.d.float()]
    sizes = [t.numel() * t.element_size() for t in pieces]
    mapping = torch.empty(sum(sizes), dtype=torch.uint8)
    views, at = [], 0
    for t, n in zip(pieces, sizes):
        v = mapping[at:at + n].view(t.dtype).view(t.shape)
        v.copy_(t)
        views.append(v)
        at += n
    out, it = [], iter(views)
    for (n_in, outs, _), per in zip(SHAPES, layers):
        row = []
        for o, w in zip(outs, per):
            if w is None:
                row.append(LayerAdapter(A=torch.zeros(1, n_in), B=torch.zeros(o, 1, dtype=torch.bfloat16),
                                        d=torch.zeros(1), top_k=1, scaling=1.0, routing="magnitude"))
            else:
                A, bt, d = next(it), next(it), next(it)
                row.append(LayerAdapter(A=A, B=bt.T, d=d, top_k=w.top_k, scaling=1.0, routing=w.routing))
        out.append(row)
    return mapping, out


def _adapter(gen: torch.Generator, keep: float = 1.0) -> list[list[LayerAdapter | None]]:
    """A rank-16, k=4 magnitude-routed adapter of SHAPES; ``keep`` < 1 zeroes that share of A's entries (its rows then
    hold fewer: another packed width), > 1 makes A denser."""
    out = []
    for n_in, outs, targeted in SHAPES:
        per = []
        for i, o in enumerate(outs):
            if i not in targeted:
                per.append(None)
                continue
            w = make_adapter(gen, n_in, o, 16, 4, "magnitude")
            if keep < 1.0:
                w = LayerAdapter(A=w.A * (torch.rand(w.A.shape, generator=gen) < keep), B=w.B, d=w.d, top_k=4,
                                 scaling=w.scaling, routing="magnitude")
            elif keep > 1.0:
                w = LayerAdapter(A=w.A + (w.A == 0) * torch.randn(w.A.shape, generator=gen) * 0.01, B=w.B, d=w.d,
                                 top_k=4, scaling=w.scaling, routing="magnitude")
            per.append(w)
        out.append(per)
    return out


def _slot_sets(gen: torch.Generator, max_nnz: int | None = None) -> list:
    """Slot sets of SHAPES with slot 1 holding a larger adapter, slot 2 a smaller one, 0 and 3 others."""
    sets = [allocate_slots(4, 32, n_in, outs, b_dtype=torch.bfloat16, max_nnz=max_nnz or n_in, **LAYOUT)
            for n_in, outs, _ in SHAPES]
    for sl, (n_in, outs, _) in zip(sets, SHAPES):
        for s, (r, k) in enumerate([(8, 2), (32, 8), (4, 1), (8, 2)]):
            load_slot(sl, s, [make_adapter(gen, n_in, o, r, k) for o in outs])
    return sets


def _same(a: list, b: list) -> bool:
    return all(x.host_meta == y.host_meta and x.host_extent == y.host_extent
               and all(torch.equal(u, v) for s in range(4) for u, v in zip(_slot_buffers(x, s), _slot_buffers(y, s)))
               for x, y in zip(a, b))


def _images_write(sets: list, layers: list, slot: int):
    """What the engine runs for an adapter without a template: its images, a plan, the write."""
    images = prepare_slots(list(zip(sets, layers)), check_finite=False, pack_at_write=True)
    pairs = list(zip(sets, images))
    return write_slots(pairs, slot), pairs


def test_rebased_template_writes_what_the_adapters_own_images_write() -> None:
    gen = torch.Generator().manual_seed(5)
    seed = int(torch.randint(0, 1 << 30, (1,), generator=gen))
    by_images = _slot_sets(torch.Generator().manual_seed(seed))
    by_template = _slot_sets(torch.Generator().manual_seed(seed))
    first_map, first = _file(_adapter(gen))
    _images_write(by_images, first, 0)
    _, pairs = _images_write(by_template, first, 0)  # the engine's first adapter of a layout, then its template
    template = AdapterTemplate.from_plan(plan_writes(pairs), first_map)
    first_extents = [im.extent for _, im in pairs]
    assert template is not None
    # it keeps the placeholders and meta rows alive, never the first adapter's file
    assert template.sources and all(t.untyped_storage().data_ptr() != first_map.data_ptr() for t in template.sources)
    assert _same(by_images, by_template)
    # other adapters of the layout: denser rows (over the larger adapter of slot 1: written over) and sparser ones
    # (over the smaller one of slot 2, then slot 0 again), each in its own file
    for keep, slot in ((1.5, 1), (0.5, 2), (1.0, 0)):
        mapping, layers = _file(_adapter(gen, keep))
        _images_write(by_images, layers, slot)
        write = template.instantiate(mapping)
        assert (list(write.extents) != first_extents) == (keep != 1.0)  # other packed widths where A differs
        write.write(slot)
        assert _same(by_images, by_template), (keep, slot)
        write.write(3)  # the same write again, into another slot
        _images_write(by_images, layers, 3)
        assert _same(by_images, by_template), (keep, 3)


def test_rebased_template_refuses_rows_the_slots_cannot_hold_and_writes_nothing() -> None:
    gen = torch.Generator().manual_seed(6)
    sets = _slot_sets(gen, max_nnz=40)
    first_map, first = _file(_adapter(gen, 0.5))
    _, pairs = _images_write(sets, first, 0)
    template = AdapterTemplate.from_plan(plan_writes(pairs), first_map)
    before = [[b.clone() for s in range(4) for b in _slot_buffers(sl, s)] for sl in sets]
    dense_map, _ = _file(_adapter(gen, 1.5))  # rows of up to 64 entries: the slots hold 40
    with pytest.raises(ValueError, match="layer 0 of 3, slice 0: A rows hold up to 64 nonzeros, slots allow 40"):
        template.instantiate(dense_map)
    with pytest.raises(ValueError, match="uint8"):
        template.instantiate(first_map[:-2])
    after = [[b for s in range(4) for b in _slot_buffers(sl, s)] for sl in sets]
    assert all(torch.equal(x, y) for u, v in zip(before, after) for x, y in zip(u, v))


def test_no_template_of_a_plan_with_values_outside_the_file() -> None:
    """A source outside the file that is not a meta row or zeros (here a B the write converts, or a nonzero d made
    apart from the file) would be served to every later adapter: no template."""
    gen = torch.Generator().manual_seed(7)
    sets = _slot_sets(gen)
    mapping, layers = _file(_adapter(gen))
    converted = [list(per) for per in layers]
    w = converted[0][0]
    converted[0][0] = LayerAdapter(A=w.A, B=w.B.float(), d=w.d, top_k=w.top_k, scaling=1.0, routing=w.routing)
    _, pairs = _images_write(sets, converted, 0)
    assert AdapterTemplate.from_plan(plan_writes(pairs), mapping) is None
    apart = [list(per) for per in layers]
    w = apart[1][0]
    apart[1][0] = LayerAdapter(A=w.A, B=w.B, d=w.d.clone() + 1, top_k=w.top_k, scaling=1.0, routing=w.routing)
    _, pairs = _images_write(sets, apart, 0)
    assert AdapterTemplate.from_plan(plan_writes(pairs), mapping) is None
    _, pairs = _images_write(sets, layers, 0)
    assert AdapterTemplate.from_plan(plan_writes(pairs), mapping) is not None
