"""``flylora_apply`` on the CPU backend (and the naive reference backend) against the reference oracle.

A covering sample, not the full product: every hidden size (576, 1536, 4096), rank (8, 16, 32, 64),
k in {1, r/4, r}, token count (1, 3, 7, 16, 96, 133, 512), spread (sorted runs too), dtype and routing appears at least once, with
single, qkv-like (3 slices) and gate_up-like (2 slices) layers, dense and compact A.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.cases import Case
from tests.kernels.check import check_case

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
QKV = (576, 192, 192)  # SmolLM2 q/k/v (9 heads, 3 KV heads, head dim 64)

CASES = {
    "decode-distinct-qkv-bf16": Case(7, 576, QKV, ((32, 8),), "distinct", BF16),
    "t1-identical-f32-r16": Case(1, 576, (576,), ((16, 4),), "identical", F32),
    "t3-down1536-uniform-f16-magnitude-k1": Case(3, 1536, (576,), ((8, 1),), "uniform", F16, "magnitude"),
    "t133-gateup-zipf-bf16-r64-compact": Case(133, 576, (1536, 1536), ((64, 16),), "zipf", BF16, compact=True),
    "t512-qkv-skewed-f32-k=r": Case(512, 576, QKV, ((32, 32),), "skewed", F32),
    "t133-h4096-none-rows-bf16": Case(133, 4096, (1024,), ((32, 8),), "none_rows", BF16, S=4),
    "t512-uniform-f16-magnitude-compact": Case(512, 576, (576,), ((16, 16),), "none_rows", F16, "magnitude",
                                               compact=True),
    "t133-mixed-ranks-mixed-routing-bf16": Case(133, 576, QKV, ((8, 2), (16, 1), (32, 32), (64, 16)),
                                                "uniform", BF16, "mixed"),
    "t7-h4096-qkv-distinct-f32-compact": Case(7, 4096, (4096, 1024, 1024), ((64, 16),), "distinct", F32,
                                              compact=True),
    "t512-h1536-zipf-bf16-S16": Case(512, 1536, (576,), ((32, 8),), "zipf", BF16, S=16),
    "t3-identical-f16-k1": Case(3, 576, (576,), ((32, 1),), "identical", F16),
    "t7-all-none-bf16": Case(7, 576, QKV, ((32, 8),), "all_none", BF16),
    "decode16-distinct-gateup-f32-r16-mixed": Case(16, 576, (1536, 1536), ((16, 4), (8, 8)), "distinct", F32,
                                                   "mixed", S=16),
    "t512-skewed-S64-f16": Case(512, 576, (576,), ((32, 8),), "skewed", F16, S=64),
    "t133-runs-qkv-bf16-mixed-ranks": Case(133, 576, QKV, ((32, 8), (16, 4)), "runs", BF16, "mixed"),
    "t96-runs-gateup-f32": Case(96, 1536, (576, 576), ((32, 8),), "runs", F32, S=4),
}


@pytest.mark.parametrize("backend", ["cpu", "cpu-native", "cpu-small", "cpu-grouped"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_cpu_matches_reference(case: Case, backend: str) -> None:
    """The default CPU dispatch and each of its three paths forced on every case (the small path on 512
    tokens too: its choice is a speed matter, never a correctness one)."""
    check_case(case, backend)


SMALL = {k: CASES[k] for k in ("decode-distinct-qkv-bf16", "t3-down1536-uniform-f16-magnitude-k1",
                                "t133-mixed-ranks-mixed-routing-bf16")}


@pytest.mark.parametrize("case", SMALL.values(), ids=SMALL.keys())
def test_naive_backend_matches_reference(case: Case) -> None:
    check_case(case, "reference")


#: The engine's CPU layout: packed compact A, 16-bit indices, read only by the compiled kernel.
PACKED = {
    "packed-decode16-qkv-bf16-S16": Case(16, 576, QKV, ((32, 8),), "distinct", BF16, S=16, packed=True),
    "packed-t133-gateup-mixed-ranks-f32": Case(133, 576, (1536, 1536), ((32, 8), (16, 16), (8, 2)), "runs", F32,
                                               "mixed", packed=True),
    "packed-t7-down1536-f16-none-rows": Case(7, 1536, (576,), ((64, 16),), "none_rows", F16, packed=True),
    "packed-t512-h4096-zipf-bf16-k=r": Case(512, 4096, (1024,), ((32, 32),), "zipf", BF16, S=4, packed=True),
    # bf16 A values (bf16 engines): the decode shrink expands 16-bit values; blocks of 3+ and odd sizes too
    "packed-bf16A-decode16-qkv-S16": Case(16, 576, QKV, ((32, 8),), "distinct", BF16, S=16, packed=True,
                                          a_dtype=BF16),
    "packed-bf16A-t2-identical-r16": Case(2, 576, (576,), ((16, 4),), "identical", BF16, packed=True, a_dtype=BF16),
    "packed-bf16A-t133-runs-gateup-mixed-ranks": Case(133, 576, (1536, 1536), ((32, 8), (16, 16), (8, 2)), "runs",
                                                      BF16, "mixed", packed=True, a_dtype=BF16),
    "packed-bf16A-t9-in100-out40-k=r": Case(9, 100, (40, 24), ((8, 8), (4, 2)), "uniform", F32, packed=True,
                                            a_dtype=BF16),
}


@pytest.mark.parametrize("backend", ["cpu", "cpu-native", "reference"])
@pytest.mark.parametrize("case", PACKED.values(), ids=PACKED.keys())
def test_packed_slots_match_reference(case: Case, backend: str) -> None:
    """Packed compact A (what the plugin allocates on CPU when the compiled kernel is available), rows of
    different lengths per slice and plain-LoRA dense rows (k = r) included."""
    check_case(case, backend)


@pytest.mark.parametrize("path", ["small", "grouped"])
def test_torch_paths_refuse_packed_slots(path: str) -> None:
    from flylora_runtime.kernels.cpu import apply_cpu

    from tests.kernels.cases import build
    _, slots, x, token_slot, out = build(PACKED["packed-t7-down1536-f16-none-rows"])
    before = out.clone()
    with pytest.raises(RuntimeError, match="compiled CPU kernel"):
        apply_cpu(out, x, token_slot, slots, path=path)
    assert torch.equal(out, before)
