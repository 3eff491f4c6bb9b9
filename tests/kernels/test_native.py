"""The compiled CPU kernel (flylora_runtime/kernels/flylora_cpu.c via kernels.native): what the shared case
table in test_apply.py does not cover: 16-bit compact indices, exact ties, bad slots, build and fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from flylora_runtime.kernels import apply_reference, build_slots, native
from flylora_runtime.kernels.cpu import apply_cpu
from flylora_runtime.reference.ops import LayerAdapter

from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason="the compiled CPU kernel is unavailable here (no C compiler?)")


def _adapter(in_f: int, outs: tuple[int, ...], r: int, k: int, seed: int, routing: str = "signed"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for o in outs:
        a = torch.randn(r, in_f, generator=g) * (torch.rand(r, in_f, generator=g) < 0.25)
        out.append(LayerAdapter(A=a, B=torch.randn(o, r, generator=g) * 0.05, d=torch.randn(r, generator=g) * 0.1,
                                top_k=k, scaling=2.0, routing=routing))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_int16_indices_match_reference(dtype: torch.dtype) -> None:
    """Compact A with 16-bit column indices (what a slot of up to 32767 inputs can use) gives the
    reference result; rows with no adapter stay bit-for-bit untouched."""
    adapters = [_adapter(576, (576, 192, 192), 32, 8, s, "magnitude" if s % 2 else "signed") for s in range(4)]
    slots = build_slots(adapters, compact=True)
    want_slots = build_slots(adapters, compact=True)
    slots.a_idx = slots.a_idx.to(torch.int16)
    x = torch.randn(21, 576).to(dtype)
    ts = torch.tensor([s % 5 - 1 for s in range(21)])
    out0 = torch.randn(21, 960).to(dtype)
    got, want = out0.clone(), out0.clone()
    apply_cpu(got, x, ts, slots, path="native")
    apply_reference(want, x, ts, want_slots)
    assert torch.equal(got[ts < 0], out0[ts < 0])
    assert_close(got[ts >= 0], want[ts >= 0], dtype)


def test_exact_ties_pick_the_lower_ranks() -> None:
    """Eight ranks with identical A rows tie exactly; with k=3 the kernel takes ranks 0, 1, 2 (as the
    Triton backend does), which B's distinct rows reveal in the output."""
    r, k, in_f, out_f = 8, 3, 64, 8
    a = torch.randn(1, in_f).expand(r, in_f).clone()
    b = torch.zeros(out_f, r)
    b[torch.arange(r), torch.arange(r)] = 1.0  # rank j writes only column j
    slots = build_slots([[LayerAdapter(A=a, B=b, d=torch.zeros(r), top_k=k, scaling=1.0, routing="signed")]])
    x = torch.randn(1, in_f)
    out = torch.zeros(1, out_f)
    apply_cpu(out, x, torch.tensor([0]), slots, path="native")
    y = float(a[0] @ x[0])
    expected = torch.zeros(out_f)
    expected[:k] = y
    assert torch.allclose(out[0], expected, atol=1e-6), out


@pytest.mark.parametrize("T", [1, 3, 8, 16, 40])
@pytest.mark.parametrize("routing", ["signed", "magnitude"])
@pytest.mark.parametrize("nan_bias", [False, True])
def test_ties_and_nan_pick_the_same_ranks_in_every_path(T: int, routing: str, nan_bias: bool) -> None:
    """The top-k's rules in each of the kernel's paths (one token; a block of 3; blocks of 8+ that pick every
    token's ranks at once, block_places; a run of 40 over three blocks): every token's scores tie on ranks 1-4
    (identical A rows) and ranks 0 and 5 score lower, so with k=3 the kernel takes ranks 1, 2, 3 (the lower ones
    of the tie); with a NaN routing bias on rank 5 (put in the slot
    directly: loads refuse one), its score is NaN, which counts as +inf: ranks 1, 2, 5. B's
    rows are one-hot, so the output's columns name the ranks taken."""
    r, k, in_f = 6, 3, 32
    g = torch.Generator().manual_seed(T)
    row = torch.randn(in_f, generator=g).abs() + 0.5  # y = row . x > 0 for x > 0: |y| orders as y does
    a = torch.stack([0.5 * row, row, row, row, row, 0.25 * row])
    slots = build_slots([[LayerAdapter(A=a, B=torch.eye(r), d=torch.zeros(r), top_k=k, scaling=1.0, routing=routing)]])
    if nan_bias:  # the loader refuses non-finite weights; written into the slot to reach the kernel's rule
        slots.d[0, 5] = float("nan")
    x = torch.rand(T, in_f, generator=g) + 0.1
    out = torch.zeros(T, r)
    apply_cpu(out, x, torch.zeros(T, dtype=torch.int32), slots, path="native")
    want = {1, 2, 5} if nan_bias else {1, 2, 3}
    for t in range(T):
        assert {j for j in range(r) if out[t, j] != 0} == want, (t, out[t])


def test_slot_out_of_range_raises_and_writes_nothing() -> None:
    slots = build_slots([_adapter(64, (32,), 8, 2, 0)])
    out = torch.randn(3, 32)
    before = out.clone()
    with pytest.raises(ValueError, match=r"\[-1, 1\)"):
        apply_cpu(out, torch.randn(3, 64), torch.tensor([0, 1, -1]), slots, path="native")
    assert torch.equal(out, before)


def test_rank_above_64_falls_back_to_torch() -> None:
    """R > 64 is outside the compiled kernel (its stack buffers): ``supports`` says so and the default
    dispatch still gives the right answer through the torch paths."""
    adapters = [_adapter(64, (32,), 96, 8, 1)]
    slots = build_slots(adapters)
    x, ts = torch.randn(2, 64), torch.tensor([0, 0])
    assert not native.supports(torch.zeros(2, 32), x, ts, slots)
    got, want = torch.zeros(2, 32), torch.zeros(2, 32)
    apply_cpu(got, x, ts, slots)
    apply_reference(want, x, ts, slots)
    assert_close(got, want, torch.float32)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A clean build state (the module caches the loaded library) and an empty kernel cache folder."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("FLYLORA_KERNEL_CACHE", str(tmp_path))
    return tmp_path


def test_build_is_cached_and_reused(fresh_native) -> None:
    lib = native.library()
    assert lib is not None
    built = list(fresh_native.glob("flylora_cpu_*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native._lib, native._tried = None, False
    assert native.library() is not None
    assert built[0].stat().st_mtime_ns == mtime, "the cached library was rebuilt"


def test_missing_compiler_falls_back_with_a_warning(fresh_native, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
    assert "no C compiler" in caplog.text
    slots = build_slots([_adapter(64, (32,), 8, 2, 0)])
    x, ts = torch.randn(2, 64), torch.tensor([0, -1])
    got, want = torch.zeros(2, 32), torch.zeros(2, 32)
    apply_cpu(got, x, ts, slots)  # the torch path serves the call
    apply_reference(want, x, ts, slots)
    assert_close(got, want, torch.float32)
    with pytest.raises(RuntimeError, match="unavailable"):
        apply_cpu(got, x, ts, slots, path="native")


def test_failed_build_falls_back_with_the_compiler_error(fresh_native, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", "false")  # exists, always fails
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
    assert "compiled CPU kernel is unavailable" in caplog.text
    assert not list(fresh_native.glob("*.so"))


def test_portable_build_without_avx512_matches_reference(fresh_native, monkeypatch) -> None:
    """The kernel built for a CPU without AVX-512 (``-mno-avx512f``: the scalar compact shrink and the
    rank-counting top-k instead of the expand-load shrink and the vector argmax) gives the same answers."""
    from tests.kernels.cases import Case
    from tests.kernels.check import check_case
    from tests.kernels.test_apply import PACKED

    monkeypatch.setattr(native, "CFLAGS", [*native.CFLAGS, "-mno-avx512f"])
    assert native.library() is not None
    for name in ("packed-decode16-qkv-bf16-S16", "packed-bf16A-t133-runs-gateup-mixed-ranks",
                 "packed-bf16A-t9-in100-out40-k=r"):
        check_case(PACKED[name], "cpu-native")
    check_case(Case(16, 576, (576, 192), ((32, 8), (16, 16)), "uniform", torch.bfloat16, "mixed"), "cpu-native")


def test_disabled_by_environment(fresh_native, monkeypatch) -> None:
    monkeypatch.setenv("FLYLORA_CPU_NATIVE", "0")
    assert native.library() is None


def _draw_ranks(rng, choices: list[int]) -> tuple[tuple[int, int], ...]:
    """One to three slices' ``(r, k)``, r from ``choices``, k in [1, r]."""
    ranks = []
    for _ in range(rng.randint(1, 3)):
        r = rng.choice(choices)
        ranks.append((r, rng.randint(1, r)))
    return tuple(ranks)


def test_random_shapes_match_reference() -> None:
    """Sizes the case table does not pin down: `in` and outputs off the 16-column grid, ranks 1-64 (rows
    past a multiple of four), every layout (dense, compact, packed with fp32 or bf16 values) and dtype;
    25 drawn cases with a fixed seed, all on the compiled kernel."""
    import random

    from tests.kernels.cases import Case
    from tests.kernels.check import check_case

    if native.library() is None:
        pytest.skip("the compiled CPU kernel is unavailable here")
    rng = random.Random(7)
    for seed in range(25):
        ranks = _draw_ranks(rng, [1, 3, 5, 8, 13, 32, 64])
        S = rng.choice([1, 4, 16])
        spread = rng.choice(["uniform", "zipf", "identical", "runs", "none_rows", "distinct"])
        T = rng.choice([1, 2, 3, 5, 16, 17, 40])
        layout = rng.choice(["dense", "compact", "packed"])
        case = Case(min(T, S) if spread == "distinct" else T, rng.choice([17, 100, 576, 1000]),
                    tuple(rng.choice([1, 17, 40, 65, 576]) for _ in range(rng.randint(1, 3))), ranks, spread,
                    rng.choice([torch.float32, torch.bfloat16, torch.float16]), rng.choice(["signed", "magnitude", "mixed"]),
                    compact=layout == "compact", S=S, packed=layout == "packed", seed=seed,
                    a_dtype=rng.choice([torch.float32, torch.bfloat16]))
        check_case(case, "cpu-native")


def test_bf16_engine_paths_random_shapes() -> None:
    """What a bf16 engine runs: bf16 x, A, B and out on packed slots, so the vdpbf16ps decode shrink (one
    or two tokens), the AMX block shrink with the top-k across a block's tokens (4+ tokens; on CPUs with
    AMX, else the AVX-512 block path) and the even/odd bf16 expand, at sizes off their 32-column and
    16-rank grids: `in` odd or not a multiple of 32, ranks 1-64 (one to four tiles of ranks), outputs with
    tails, blocks of 3-16 tokens and runs past 16; 25 drawn cases with a fixed seed."""
    import random

    from tests.kernels.cases import Case
    from tests.kernels.check import check_case

    if native.library() is None:
        pytest.skip("the compiled CPU kernel is unavailable here")
    rng = random.Random(4)
    for seed in range(25):
        ranks = _draw_ranks(rng, [1, 3, 5, 8, 13, 16, 17, 31, 32, 33, 48, 64])
        S = rng.choice([1, 2, 4, 16])
        spread = rng.choice(["uniform", "zipf", "identical", "runs", "none_rows"])
        T = rng.choice([3, 4, 5, 7, 16, 17, 31, 40, 96])
        case = Case(T, rng.choice([17, 31, 33, 64, 100, 576, 1000, 1536]),
                    tuple(rng.choice([1, 17, 40, 65, 576, 1536]) for _ in range(rng.randint(1, 3))), ranks,
                    spread, torch.bfloat16, rng.choice(["signed", "magnitude", "mixed"]), S=S, packed=True, seed=seed,
                    a_dtype=torch.bfloat16)
        check_case(case, "cpu-native")


@pytest.mark.parametrize("a_dtype,v_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float16, torch.float16)])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("n_in", [100, 1553])
def test_pack_rows_equals_the_torch_compaction(a_dtype, v_dtype, index_dtype, n_in, monkeypatch) -> None:
    """The C packing of one slice's A (prepare_slot's fast path) gives bit for bit what the torch compaction
    and column words give: rows of unequal counts, an all-zero row, a dense row, -0.0 and subnormal entries
    kept, values rounded as torch rounds, and ``in`` not a multiple of 16 (100: under one 32-column step of
    the AVX-512 path for 16-bit A; 1553: many steps and a tail of 17, which ends in the middle of a word)."""
    from flylora_runtime.weights.packing import column_words, compact_rows

    g = torch.Generator().manual_seed(31)
    A = torch.randn(20, n_in, generator=g) * (torch.rand(20, n_in, generator=g) < torch.rand(20, 1, generator=g))
    A[3] = 0.0
    A[4] = torch.randn(n_in, generator=g)  # every column
    A[5, 7], A[6, n_in - 1], A[7, 0] = -0.0, 1e-40, 1.00390625  # -0.0 (kept), a subnormal, a tie in bf16 rounding
    A = A.to(a_dtype)
    real_empty = torch.empty
    # The outputs poisoned (torch.empty may hand back an earlier call's correct bytes): every word, index and
    # value must be written.
    with monkeypatch.context() as patched:
        patched.setattr(torch, "empty", lambda *shape, dtype: real_empty(*shape, dtype=dtype).fill_(7))
        got = native.pack_rows(A, index_dtype, v_dtype)
    assert got is not None
    idx, val, mask, p = got
    want_idx, want_val, _ = compact_rows(A)
    assert p == want_idx.shape[1] == int((A.view(torch.int16 if a_dtype != torch.float32 else torch.int32) != 0)
                                         .sum(1).max())
    assert torch.equal(idx, want_idx.reshape(-1).to(index_dtype))
    assert torch.equal(val.view(torch.uint8), want_val.to(v_dtype).reshape(-1).contiguous().view(torch.uint8))
    assert torch.equal(mask, column_words(A))


def test_pack_rows_refuses_what_it_does_not_convert() -> None:
    assert native.pack_rows(torch.ones(2, 16, dtype=torch.bfloat16), torch.int16, torch.float16) is None
