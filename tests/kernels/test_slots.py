"""Slot buffers and edge semantics shared by all backends: padded ranks, empty rows, hot swap, validation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from flylora_runtime.kernels import (allocate_slots, build_slots, clear_slot, dense_a, flylora_apply, load_slot,
                                    prepare_slot, write_slot)
from flylora_runtime.reference.ops import LayerAdapter, flylora_delta
from tests.helpers import assert_close

from tests.kernels.cases import make_adapter
from tests.kernels.check import run_backend

BACKENDS = ("cpu-native", "cpu-small", "cpu-grouped", "reference")


def _poison_padding(slots, r: int) -> None:
    """Fill every padded rank (``>= r``) with values that would dominate any selection and any sum."""
    R = slots.max_rank
    for i in range(slots.num_slices):
        slots.d[:, i * R + r:(i + 1) * R] = 1e4
        slots.a_val[:, i * R + r:(i + 1) * R] = 1.0
    for i in range(slots.num_slices):
        slots.b_view(i)[:, r:] = 1e3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("routing", ["signed", "magnitude"])
@pytest.mark.parametrize("T", [5, 40])  # 40: long segments, the grouped path's dense expand
def test_padded_ranks_never_selected(backend: str, routing: str, T: int) -> None:
    gen = torch.Generator().manual_seed(1)
    w = make_adapter(gen, 64, 32, r=8, k=8, routing=routing)  # k = r: every real rank must fire
    # Signed: all real scores very negative, so a padded rank (score 0 if left unmasked) would win.
    w = LayerAdapter(A=w.A, B=w.B, d=torch.full((8,), -100.0), top_k=8, scaling=w.scaling, routing=routing)
    slots = build_slots([[w], [w]], max_rank=32, b_dtype=torch.float32)
    _poison_padding(slots, 8)
    x = torch.randn(T, 64, generator=gen)
    out = torch.zeros(T, 32)
    run_backend(out, x, torch.tensor([0, 1, 1, 0, 1] * (T // 5), dtype=torch.int32), slots, backend)
    assert_close(out, flylora_delta(x, torch.zeros(T, dtype=torch.long), [w]), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_adapter_rows_bit_exact_and_empty_slot_is_zero(backend: str) -> None:
    gen = torch.Generator().manual_seed(2)
    slots = build_slots([[make_adapter(gen, 64, 48, 16, 4)]], num_slots=3, b_dtype=torch.bfloat16)
    x = torch.randn(6, 64, generator=gen).bfloat16()
    out0 = torch.randn(6, 48, generator=gen).bfloat16()
    out = out0.clone()
    slot = torch.tensor([-1, 0, -1, 2, 1, -1], dtype=torch.int32)  # slots 1 and 2 are empty
    run_backend(out, x, slot, slots, backend)
    untouched = torch.tensor([True, False, True, True, True, True])
    assert torch.equal(out[untouched], out0[untouched])
    assert not torch.equal(out[1], out0[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_lora_equivalence(backend: str) -> None:
    """top_k == r and d == 0 is exactly plain LoRA: ``scaling * x A^T B^T``."""
    gen = torch.Generator().manual_seed(3)
    A, B = torch.randn(16, 96, generator=gen) / 16, torch.randn(40, 16, generator=gen)
    w = LayerAdapter(A=A, B=B, d=torch.zeros(16), top_k=16, scaling=0.5)
    slots = build_slots([[w]], b_dtype=torch.float32)
    x = torch.randn(9, 96, generator=gen)
    out = torch.zeros(9, 40)
    run_backend(out, x, torch.zeros(9, dtype=torch.int64), slots, backend)
    assert_close(out, 0.5 * (x @ A.T @ B.T), torch.float32)


def test_hot_swap_and_clear() -> None:
    gen = torch.Generator().manual_seed(4)
    w1, w2 = make_adapter(gen, 64, 32, 16, 4), make_adapter(gen, 64, 32, 8, 2, "magnitude")
    slots = allocate_slots(2, 16, 64, (32,), max_nnz=16, b_dtype=torch.float32)
    x, slot = torch.randn(4, 64, generator=gen), torch.ones(4, dtype=torch.int32)
    for w in (w1, w2):
        load_slot(slots, 1, [w])
        out = torch.zeros(4, 32)
        flylora_apply(out, x, slot, slots)
        assert_close(out, flylora_delta(x, torch.zeros(4, dtype=torch.long), [w]), torch.float32)
    # Compact A holds w2 exactly (and nothing of w1's longer rows).
    assert torch.equal(dense_a(slots)[1, :8], w2.A)
    assert torch.equal(dense_a(slots)[1, 8:], torch.zeros(8, 64))
    clear_slot(slots, 1)
    out = torch.zeros(4, 32)
    flylora_apply(out, x, slot, slots)
    assert torch.equal(out, torch.zeros(4, 32))
    assert slots.k.tolist() == [[0], [0]] and slots.r.tolist() == [[0], [0]]
    assert slots.host_meta == [((0,), (0,), False), ((0,), (0,), False)]


def test_host_meta_mirrors_slot_tensors() -> None:
    """The CPU backend plans calls from ``host_meta``: it must equal ``k``, ``r``, ``magnitude`` after
    every load and clear."""
    gen = torch.Generator().manual_seed(7)
    slots = allocate_slots(3, 16, 64, (32, 16))
    mirror = lambda: [(tuple(k), tuple(r), bool(m)) for k, r, m in  # noqa: E731
                      zip(slots.k.tolist(), slots.r.tolist(), slots.magnitude.tolist())]
    assert slots.host_meta == mirror() == [((0, 0), (0, 0), False)] * 3
    load_slot(slots, 1, [make_adapter(gen, 64, 32, 16, 4, "magnitude"), make_adapter(gen, 64, 16, 8, 2, "magnitude")])
    load_slot(slots, 2, [make_adapter(gen, 64, 32, 4, 1), make_adapter(gen, 64, 16, 16, 16)])
    assert slots.host_meta == mirror() == [((0, 0), (0, 0), False), ((4, 2), (16, 8), True), ((1, 16), (4, 16), False)]
    clear_slot(slots, 1)
    assert slots.host_meta == mirror() == [((0, 0), (0, 0), False)] * 2 + [((1, 16), (4, 16), False)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_of_empty_slots_and_none_rows_mixed(backend: str) -> None:
    """Rows of empty slots and rows with slot -1, interleaved with repeated, non-contiguous adapters:
    the empty and -1 rows are untouched bit for bit, the others match the reference."""
    gen = torch.Generator().manual_seed(8)
    ws = [[make_adapter(gen, 64, 24, 8, 2), make_adapter(gen, 64, 8, 8, 2)] for _ in range(2)]
    slots = allocate_slots(4, 8, 64, (24, 8), b_dtype=torch.float32)
    load_slot(slots, 0, ws[0])
    load_slot(slots, 3, ws[1])
    x = torch.randn(9, 64, generator=gen)
    out0 = torch.randn(9, 32, generator=gen)
    out0[2, 0] = -0.0  # adding a zero delta would turn this into +0.0: untouched rows must not be added to
    slot = torch.tensor([3, -1, 1, 0, 3, 2, -1, 0, 3], dtype=torch.int32)
    out = out0.clone()
    run_backend(out, x, slot, slots, backend)
    idle = torch.tensor([False, True, True, False, False, True, True, False, False])
    assert torch.equal(out[idle].view(torch.int32), out0[idle].view(torch.int32))  # bit for bit
    for t in (~idle).nonzero().flatten().tolist():
        w = ws[0] if int(slot[t]) == 0 else ws[1]
        want = torch.cat([flylora_delta(x[t:t + 1], torch.zeros(1, dtype=torch.long), [w[i]]) for i in range(2)], 1)
        assert_close(out[t:t + 1], out0[t:t + 1] + want, torch.float32)


def _slot_buffers(slots, s: int) -> list[torch.Tensor]:
    out = [slots.a_val[s], slots.d[s], slots.k[s], slots.r[s], slots.magnitude[s]]
    out += [slots.b_view(i)[s] for i in range(slots.num_slices)]
    out += [t[s] for t in (slots.a_idx, slots.a_nnz, slots.a_mask) if t is not None]
    return out


@pytest.mark.parametrize("layout", [{}, {"max_nnz": 64}, {"max_nnz": 64, "packed": True, "index_dtype": torch.int16,
                                                             "a_dtype": torch.bfloat16}])
def test_slot_image_written_over_a_larger_adapter_equals_load_slot(layout: dict) -> None:
    """write_slot(prepare_slot(...)) leaves the slot bit for bit as load_slot into an empty slot does, over a
    slot that held a larger adapter (higher r, denser rows, magnitude routing: cleared first) and over a
    smaller one (overwritten in place); the image is reusable, and an image made for another slot layout is
    refused before anything is written."""
    gen = torch.Generator().manual_seed(11)
    big = [make_adapter(gen, 64, 32, 16, 8, "magnitude"), make_adapter(gen, 64, 16, 16, 4, "magnitude")]
    small = [make_adapter(gen, 64, 32, 4, 2), make_adapter(gen, 64, 16, 8, 8)]
    for w in small:  # sparser rows than `big`, so stale entries past them would show
        w.A[:, 1::2] = 0.0
    want = allocate_slots(3, 16, 64, (32, 16), b_dtype=torch.bfloat16, **layout)
    load_slot(want, 1, small)
    got = allocate_slots(3, 16, 64, (32, 16), b_dtype=torch.bfloat16, **layout)
    load_slot(got, 1, big)
    image = prepare_slot(got, small)
    write_slot(got, 1, image)
    write_slot(got, 2, image)
    for s in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(_slot_buffers(got, s), _slot_buffers(want, 1))), s
        assert got.host_meta[s] == want.host_meta[1] == ((2, 8), (4, 8), False)
    # and the other way round: the larger adapter over the smaller one (written without clearing first)
    load_slot(want, 0, big)
    write_slot(got, 1, prepare_slot(got, big))
    assert all(torch.equal(a, b) for a, b in zip(_slot_buffers(got, 1), _slot_buffers(want, 0)))
    other = allocate_slots(3, 16, 64, (32, 16), b_dtype=torch.float32, **layout)
    before = [t.clone() for t in _slot_buffers(other, 0)]
    with pytest.raises(ValueError, match="another slot layout"):
        write_slot(other, 0, image)
    assert all(torch.equal(a, b) for a, b in zip(before, _slot_buffers(other, 0)))
    with pytest.raises(ValueError, match="slot must be"):
        write_slot(got, 3, image)


def test_load_slot_rejects_bad_adapters() -> None:
    gen = torch.Generator().manual_seed(5)
    slots = allocate_slots(2, 16, 64, (32, 16), max_nnz=8, max_top_k=4)
    good = [make_adapter(gen, 64, 32, 16, 4), make_adapter(gen, 64, 16, 16, 4)]
    with pytest.raises(ValueError, match="slot must be"):
        load_slot(slots, 2, good)
    with pytest.raises(ValueError, match="expected 2 slice"):
        load_slot(slots, 0, good[:1])
    with pytest.raises(ValueError, match="routing"):
        load_slot(slots, 0, [good[0], make_adapter(gen, 64, 16, 16, 4, "magnitude")])
    with pytest.raises(ValueError, match="top_k"):
        load_slot(slots, 0, [make_adapter(gen, 64, 32, 16, 8), good[1]])  # k 8 > max_top_k 4
    with pytest.raises(ValueError, match="r <= 16"):
        load_slot(slots, 0, [make_adapter(gen, 64, 32, 32, 4), good[1]])
    with pytest.raises(ValueError, match="nonzeros"):
        load_slot(slots, 0, good)  # rows hold 16 nonzeros, slots allow 8
    with pytest.raises(ValueError, match="B \\[32, r\\]"):
        load_slot(slots, 0, [good[1], good[0]])
    wide = allocate_slots(2, 16, 64, (32, 16), max_nnz=64, max_top_k=4, packed=True)
    load_slot(wide, 0, good)
    before = [t.clone() for t in (wide.a_val, wide.a_mask, wide.b, wide.d, wide.k)]
    for name in ("A", "B", "d"):
        bad = make_adapter(gen, 64, 32, 16, 4)
        getattr(bad, name).view(-1)[3] = float("inf") if name != "d" else float("nan")
        with pytest.raises(ValueError, match=f"{name} holds non-finite"):
            load_slot(wide, 0, [bad, good[1]])
    assert all(torch.equal(a, b) for a, b in zip(before, (wide.a_val, wide.a_mask, wide.b, wide.d, wide.k)))


def test_flylora_apply_validates_inputs() -> None:
    gen = torch.Generator().manual_seed(6)
    slots = build_slots([[make_adapter(gen, 64, 32, 8, 2)]])
    x, out, slot = torch.randn(3, 64), torch.zeros(3, 32), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="x must be"):
        flylora_apply(out, torch.randn(3, 65), slot, slots)
    with pytest.raises(ValueError, match="out must be"):
        flylora_apply(torch.zeros(3, 31), x, slot, slots)
    with pytest.raises(ValueError, match="token_slot must be int"):
        flylora_apply(out, x, slot.float(), slots)
    with pytest.raises(ValueError, match="token_slot values"):
        flylora_apply(out, x, torch.tensor([0, 1, -1], dtype=torch.int32), slots)
    with pytest.raises(ValueError, match="backend must be"):
        flylora_apply(out, x, slot, slots, backend="cuda")


def _tie_adapter(routing: str) -> LayerAdapter:
    """r=8, k=2, every real score exactly equal: A's rows are all ``e_0`` (so ``y_j = x[0]`` exactly, in any
    summation order) and, for magnitude routing, ``d`` alternates 0 and ``-2 x[0]`` (``|y + d| = |x[0]|``).
    B's columns are distinct powers of two, so the delta names the two selected ranks."""
    A = torch.zeros(8, 16)
    A[:, 0] = 1.0
    d = torch.zeros(8) if routing == "signed" else torch.tensor([0.0, -6.0] * 4)
    B = torch.stack([torch.full((4,), 2.0 ** j) for j in range(8)], dim=1)  # [4, 8]
    return LayerAdapter(A=A, B=B, d=d, top_k=2, scaling=1.0, routing=routing)


def tie_pairs(out_row: torch.Tensor, x0: float) -> set[tuple[int, ...]]:
    """The rank pairs whose delta equals ``out_row`` (B column j is ``2**j``; y_j = x0)."""
    v = float(out_row[0]) / x0
    return {(i, j) for i in range(8) for j in range(i + 1, 8) if v == 2.0 ** i + 2.0 ** j}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("routing", ["signed", "magnitude"])
def test_exact_ties_select_k_real_ranks(backend: str, routing: str) -> None:
    """All real scores tie: the CPU paths (``torch.topk``, no index order promised) and the reference must
    still select exactly k=2 distinct real ranks, never a padded one (R=32 > r=8)."""
    slots = build_slots([[_tie_adapter(routing)]], max_rank=32, b_dtype=torch.float32)
    x = torch.zeros(3, 16)
    x[:, 0] = 3.0
    out = torch.zeros(3, 4)
    run_backend(out, x, torch.zeros(3, dtype=torch.int32), slots, backend)
    for t in range(3):
        assert len(tie_pairs(out[t], 3.0)) == 1, f"row {t}: {out[t].tolist()} is not a sum of 2 real ranks"
        assert torch.equal(out[t], out[t, :1].expand(4))


@pytest.mark.parametrize("layout", [{}, {"max_nnz": 64, "packed": True, "index_dtype": torch.int16,
                                         "a_dtype": torch.bfloat16},
                                    {"max_nnz": 64, "packed": True, "index_dtype": torch.int32}])
@pytest.mark.parametrize("b_form", ["B^T contiguous", "B as given", "scaled fp32"])
def test_compiled_slot_write_equals_torchs_copies(layout: dict, b_form: str) -> None:
    """write_slot's one-call copy (flylora_cpu_copy_pieces, from the image's table) writes exactly what
    torch's copies write, into the right slot and nowhere else, whether B is one contiguous run of the
    slot's dtype or has to be converted or transposed (those pieces are copied by torch)."""
    from flylora_runtime.kernels import lifecycle, native

    if native.library() is None:
        pytest.skip("the compiled CPU kernel is unavailable")
    gen = torch.Generator().manual_seed(5)
    adapters = [make_adapter(gen, 64, 32, 12, 3, "magnitude"), make_adapter(gen, 64, 16, 12, 5, "magnitude")]
    for w in adapters:
        w.A[:, 1::3] = 0.0
    if b_form == "B^T contiguous":  # as the engine form hands it: a transposed view of B^T, already bf16
        adapters = [replace(w, B=w.B.to(torch.bfloat16).T.contiguous().T, scaling=1.0) for w in adapters]
    elif b_form == "scaled fp32":
        adapters = [replace(w, scaling=0.75) for w in adapters]
    slots = [allocate_slots(4, 16, 64, (32, 16), b_dtype=torch.bfloat16, **layout) for _ in range(2)]
    fill = [[make_adapter(gen, 64, 32, 16, 4), make_adapter(gen, 64, 16, 16, 4)] for _ in range(4)]
    for s in slots:  # something in every slot first, so that a write to the wrong place shows
        for i in range(4):
            load_slot(s, i, fill[i])
    image = prepare_slot(slots[0], adapters)
    write_slot(slots[0], 2, image)
    plan = lifecycle._copy_plan(slots[0], image)
    assert plan is not None and len(plan[1]) >= 7
    assert (len(plan[2]) == 0) == (b_form == "B^T contiguous")  # leftovers: the pieces torch copies
    old = slots[1].host_extent[2]
    if old is None or any(r0 > r1 or p0 > p1 for (r0, p0), (r1, p1) in zip(old, image.extent)):
        clear_slot(slots[1], 2)
    lifecycle._write_with_torch(slots[1], 2, image)
    for s in range(4):
        assert all(torch.equal(a, b) for a, b in zip(_slot_buffers(slots[0], s), _slot_buffers(slots[1], s))), s


@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float32])
def test_image_packed_at_write_leaves_the_slot_as_a_packed_image_does(a_dtype) -> None:
    """prepare_slot(pack_at_write=True) keeps A unpacked (a_src, no packed copy) and write_slot packs it straight
    into the slot: bit for bit the slot a packed image leaves, over a larger adapter (cleared first) and a
    smaller one, in two slots, by the compiled copy and by torch's; an A too dense for the slots is refused
    when the image is made, not when it is written."""
    from flylora_runtime.kernels import lifecycle, native

    if native.library() is None:
        pytest.skip("needs the compiled CPU kernel")
    gen = torch.Generator().manual_seed(5)
    layout = {"max_nnz": 64, "packed": True, "index_dtype": torch.int16, "a_dtype": a_dtype}
    big = [make_adapter(gen, 64, 32, 16, 8, "magnitude"), make_adapter(gen, 64, 16, 16, 4, "magnitude")]
    small = [make_adapter(gen, 64, 32, 4, 2), make_adapter(gen, 64, 16, 8, 8)]
    for w in small:
        w.A[:, 1::2] = 0.0
    slots = {name: allocate_slots(3, 16, 64, (32, 16), b_dtype=torch.bfloat16, **layout)
             for name in ("packed image", "at write", "at write, torch")}
    for sl in slots.values():
        load_slot(sl, 1, big)
    want = prepare_slot(slots["packed image"], small)
    image = prepare_slot(slots["at write"], small, pack_at_write=True)
    assert want.a_src is None and image.a_src is not None
    assert all(t is None for t in (*image.a_idx, *image.a_val, *image.a_mask))
    assert image.extent == want.extent and torch.equal(image.nnz, want.nnz)
    plan = lifecycle._copy_plan(slots["at write"], image)
    assert len(plan[1]) == len(lifecycle._copy_plan(slots["packed image"], want)[1]) - 3 * 2  # no A pieces
    for s in (1, 2):
        write_slot(slots["packed image"], s, want)
        write_slot(slots["at write"], s, image)
    torch_slots = slots["at write, torch"]
    for s in (1, 2):
        old = torch_slots.host_extent[s]
        if old is None or any(r0 > r1 or p0 > p1 for (r0, p0), (r1, p1) in zip(old, image.extent)):
            clear_slot(torch_slots, s)
        lifecycle._write_with_torch(torch_slots, s, image)
    for name in ("at write", "at write, torch"):
        for s in range(3):
            assert all(torch.equal(a, b) for a, b in zip(_slot_buffers(slots[name], s),
                                                         _slot_buffers(slots["packed image"], s))), (name, s)
    narrow = allocate_slots(2, 16, 64, (32, 16), b_dtype=torch.bfloat16, **{**layout, "max_nnz": 8})
    with pytest.raises(ValueError, match="slots allow 8"):
        prepare_slot(narrow, small, pack_at_write=True)


def _engine_like(w: LayerAdapter) -> LayerAdapter:
    """``w`` as the engine holds an adapter read from its engine form: bf16 A, B a transposed view of a contiguous
    bf16 ``B^T`` with the scaling folded in, fp32 d."""
    bt = (w.scaling * w.B.T).to(torch.bfloat16).contiguous()
    return replace(w, A=w.A.to(torch.bfloat16), B=bt.T, d=w.d.float(), scaling=1.0)


def test_whole_adapter_write_equals_one_write_per_layer() -> None:
    """prepare_slots + write_slots (one count pass and two C calls for all layers: what an engine activation
    runs) leave every slot of every layer bit for bit as prepare_slot + write_slot layer by layer do, with the
    same host mirrors: engine-form layers (the fast image, its copy plan made with it), a layer whose B must be
    converted (the generic image, torch copies), a layer with a slice without weights (zero rank-1), written
    over larger adapters (cleared first) and smaller ones, first with a new plan, then reusing it in another
    slot. A plan refuses other pairs, and a slot set may appear once."""
    from flylora_runtime.kernels import native, plan_writes, prepare_slots, write_slots

    if native.library() is None:
        pytest.skip("needs the compiled CPU kernel")
    gen = torch.Generator().manual_seed(11)
    layout = {"packed": True, "index_dtype": torch.int16, "a_dtype": torch.bfloat16}
    shapes = [(64, (32, 16)), (48, (24,)), (64, (32, 16, 8)), (64, (32,))]

    def adapters():
        out = [[_engine_like(make_adapter(gen, n_in, o, 8, 2, "magnitude")) for o in outs] for n_in, outs in shapes]
        out[2] = [replace(w, B=w.B.float(), scaling=0.5) for w in out[2]]  # generic: B converted and scaled
        out[3] = [LayerAdapter(A=torch.zeros(1, 64), B=torch.zeros(32, 1), d=torch.zeros(1), top_k=1, scaling=1.0,
                               routing="magnitude")]  # a slice without weights, as flylora_slice_adapters makes
        return out

    big = [[make_adapter(gen, n_in, o, 16, 4) for o in outs] for n_in, outs in shapes]
    small = [[make_adapter(gen, n_in, o, 4, 1) for o in outs] for n_in, outs in shapes]
    sets = {name: [allocate_slots(4, 16, n_in, outs, b_dtype=torch.bfloat16, max_nnz=n_in, **layout)
                   for n_in, outs in shapes]
            for name in ("per layer", "whole")}
    fill = [[make_adapter(gen, n, o, 8, 8) for o in outs] for n, outs in shapes]
    for layers in sets.values():  # slot 1 held a larger adapter, slot 2 a smaller one, 0 and 3 others
        for sl, b, s_, f in zip(layers, big, small, fill):
            load_slot(sl, 0, f), load_slot(sl, 1, b), load_slot(sl, 2, s_), load_slot(sl, 3, f)
    new = adapters()
    per_layer = [prepare_slot(sl, ws, check_finite=False, pack_at_write=True) for sl, ws in zip(sets["per layer"], new)]
    whole = prepare_slots(list(zip(sets["whole"], new)), check_finite=False, pack_at_write=True)
    assert [hasattr(im, "_plan") for im in whole] == [True, True, False, False]  # the engine-form layers' fast path
    for a, b in zip(per_layer, whole):
        assert (a.extent, a.host_meta, a.k.tolist(), a.r.tolist(), a.nnz.tolist()) == (
            b.extent, b.host_meta, b.k.tolist(), b.r.tolist(), b.nnz.tolist())
    pairs = list(zip(sets["whole"], whole))
    plan = None
    for slot in (1, 2):
        for sl, im in zip(sets["per layer"], per_layer):
            write_slot(sl, slot, im)
        plan = write_slots(pairs, slot, plan)
        assert plan is not None and plan.pack_table.shape[0] == 2 + 1 + 3 + 1
    for a, b in zip(sets["per layer"], sets["whole"]):
        assert a.host_meta == b.host_meta and a.host_extent == b.host_extent
        for s in range(4):
            assert all(torch.equal(x, y) for x, y in zip(_slot_buffers(a, s), _slot_buffers(b, s))), s
    with pytest.raises(ValueError, match="other slots or images"):
        write_slots(pairs[:-1], 3, plan)
    with pytest.raises(ValueError, match="once"):
        plan_writes([pairs[0], pairs[0]])


def test_step_bytes_counts_a_values_column_words_and_selected_b_rows():
    """bench.step's bytes per step (its GB/s against the streaming rate): per distinct slot and slice, r*nnz A
    values, r*ceil(in/16) column words, and min(tokens*k, r) rows of B^T; a slot's second token adds B rows
    only."""
    from flylora_runtime.bench.step import step_bytes
    from flylora_runtime.training.random_adapters import sparse_A

    gen = torch.Generator().manual_seed(0)
    r, k, n_in, outs = 8, 2, 40, (24, 8)
    slots = allocate_slots(2, r, n_in, outs, max_nnz=n_in, packed=True, index_dtype=torch.int16,
                           a_dtype=torch.bfloat16, b_dtype=torch.bfloat16)
    adapter = [LayerAdapter(A=sparse_A(r, k, n_in, gen), B=torch.randn(o, r, generator=gen), d=torch.zeros(r),
                            top_k=k, scaling=1.0) for o in outs]
    load_slot(slots, 1, adapter)
    nnz = [int(slots.a_nnz[1, i]) for i in range(2)]
    assert nnz == [n_in // (r // k)] * 2  # the authors' init: in / (r / k) entries per row
    a_bytes = sum(r * m * 2 + 2 * r * 3 for m in nnz)  # bf16 values, ceil(40/16) = 3 words per row
    assert step_bytes([slots], [1]) == a_bytes + k * sum(outs) * 2
    assert step_bytes([slots], [1, 1]) == a_bytes + 2 * k * sum(outs) * 2
    assert step_bytes([slots], [1] * 10) == a_bytes + r * sum(outs) * 2  # at most all r rows of B^T


def test_read_floor_pieces_are_the_kernels_bytes_in_the_slots_own_buffers():
    """bench.step's "read only" floor reads exactly step_bytes' bytes: per item (a slot's tokens in blocks of 16),
    each slice's packed A values and column words of that slot, and k distinct rows of that slot's B^T per
    token, every piece inside the slot's own part of its buffer."""
    import random

    from flylora_runtime.bench.step import floor_pieces, step_bytes
    from flylora_runtime.training.random_adapters import sparse_A

    gen = torch.Generator().manual_seed(0)
    r, k, n_in, outs = 8, 2, 40, (24, 8)
    slots = allocate_slots(3, r, n_in, outs, max_nnz=n_in, packed=True, index_dtype=torch.int16,
                           a_dtype=torch.bfloat16, b_dtype=torch.bfloat16)
    for s in (1, 2):
        load_slot(slots, s, [LayerAdapter(A=sparse_A(r, k, n_in, gen), B=torch.randn(o, r, generator=gen),
                                          d=torch.zeros(r), top_k=k, scaling=1.0) for o in outs])
    tokens = [2, 1, 2] + [1] * 17  # slot 1: 18 tokens (two blocks), slot 2: 2
    table, starts = floor_pieces(torch.tensor(tokens, dtype=torch.int32), slots, random.Random(0))
    assert starts.tolist()[-1] == table.shape[0] and len(starts) == 1 + 3  # items: 16 + 2 tokens of slot 1, slot 2
    a_bytes = {s: step_bytes([slots], [s]) - k * sum(outs) * 2 for s in (1, 2)}  # A values + column words
    # slot 1's A once per block of 16, k rows of B^T per token (as the kernel loads them)
    assert int(table[:, 1].sum()) == 2 * a_bytes[1] + a_bytes[2] + 20 * k * sum(outs) * 2
    one_each, _ = floor_pieces(torch.tensor([1, 2], dtype=torch.int32), slots, random.Random(1))
    assert int(one_each[:, 1].sum()) == step_bytes([slots], [1, 2])  # a decode step: exactly step_bytes

    def inside(t: torch.Tensor, addr: int, size: int) -> bool:
        lo = t.data_ptr()
        return lo <= addr and addr + size <= lo + t.numel() * t.element_size()

    for w, (s, n_tok) in enumerate([(1, 16), (1, 2), (2, 2)]):
        rows, pos = table[starts[w]:starts[w + 1]].tolist(), 0
        for i, o in enumerate(outs):  # per slice: its A values, its column words, then k rows of B^T per token
            assert inside(slots.a_val[s], *rows[pos]) and inside(slots.a_mask[s], *rows[pos + 1])
            pos += 2
            for _ in range(n_tok):
                picked, pos = rows[pos:pos + k], pos + k
                assert all(inside(slots.b_view(i)[s], *p) and p[1] == 2 * o for p in picked)
                assert len({p[0] for p in picked}) == k
        assert pos == len(rows)


def test_load_benchmark_times_three_ways_and_finds_the_same_slots(demo_model_dir, tmp_path, capsys):
    """bench.load on one demo-model adapter (one round, seven slots): every step timed for the three ways, in its
    JSON and its table, and the slots written layer by layer, as a whole adapter and from a rebased template
    compared equal."""
    import json

    from flylora_runtime.bench import load
    from flylora_runtime.kernels import native

    if native.library() is None:
        pytest.skip("needs the compiled CPU kernel")
    out = tmp_path / "load.json"
    assert load.main(["--rounds", "1", "--slots", "7", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["identical"] is True and report["slots"] == 7
    for way in ("per layer", "whole adapter", "template"):
        assert set(report["results"][way]) == {"read", "images", "first write", "re-activation"}
        assert all(v["median_ms"] > 0 for v in report["results"][way].values())
    assert "slots written the three ways are identical: True" in capsys.readouterr().out
