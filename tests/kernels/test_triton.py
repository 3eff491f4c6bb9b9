"""The Triton backend against the reference: small shapes under ``TRITON_INTERPRET=1`` on CPU tensors
(CI, no GPU), and the whole CPU case table on a real GPU when one is present."""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# An earlier test module that imported vLLM imported triton too; without TRITON_INTERPRET=1 then, triton's own
# jit'd helpers are compiled-mode functions that the interpreter cannot call.
TRITON_IMPORTED_UNINTERPRETED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not HAS_CUDA:
    # Must be set before triton.jit decorates the kernels (at import of triton_kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton is not installed ({exc}); the Triton backend is not tested", allow_module_level=True)

from flylora_runtime.kernels import build_slots, flylora_apply  # noqa: E402
from flylora_runtime.kernels import triton_kernels  # noqa: E402
from flylora_runtime.reference.ops import LayerAdapter, flylora_delta  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

from tests.kernels.cases import Case, make_adapter  # noqa: E402
from tests.kernels.check import check_case  # noqa: E402
from tests.kernels.test_apply import CASES  # noqa: E402
from tests.kernels.test_slots import _poison_padding, _tie_adapter, tie_pairs  # noqa: E402

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: triton cannot run here", allow_module_level=True)
if not HAS_CUDA and (TRITON_IMPORTED_UNINTERPRETED
                     or type(triton_kernels._shrink_topk).__name__ != "InterpretedFunction"):
    pytest.skip("triton or triton_kernels was imported before TRITON_INTERPRET=1 was set; run this module alone",
                allow_module_level=True)

DEVICE = "cuda" if HAS_CUDA else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# The interpreter runs each program in Python (~0.1-0.3 s per token and slice): a few small shapes.
SMALL = {
    "t1-identical-f32-r16-compact": Case(1, 64, (48,), ((16, 4),), "identical", F32, compact=True, S=2),
    "t3-qkv-distinct-bf16-r32": Case(3, 576, (64, 32, 32), ((32, 8),), "distinct", BF16, S=4),
    "t7-none-rows-f16-magnitude-r8-k1-compact": Case(7, 64, (40,), ((8, 1),), "none_rows", F16, "magnitude",
                                                     compact=True, S=3),
    "t5-gateup-mixed-r64-k=r-bf16": Case(5, 64, (24, 24), ((64, 64), (8, 2)), "uniform", BF16, "mixed", S=2),
    "t3-h1536-zipf-f32-r16-k=r/4": Case(3, 1536, (16,), ((16, 4),), "zipf", F32, compact=True, S=3),
    "t4-all-none-bf16": Case(4, 64, (16,), ((8, 2),), "all_none", BF16, S=2),
}


@pytest.mark.parametrize("case", SMALL.values(), ids=SMALL.keys())
def test_triton_small(case: Case) -> None:
    check_case(case, "triton", DEVICE)


@pytest.mark.parametrize("routing", ["signed", "magnitude"])
def test_triton_padded_ranks_never_selected(routing: str) -> None:
    gen = torch.Generator().manual_seed(1)
    w = make_adapter(gen, 64, 32, r=8, k=8, routing=routing)
    w = LayerAdapter(A=w.A, B=w.B, d=torch.full((8,), -100.0), top_k=8, scaling=w.scaling, routing=routing)
    slots = build_slots([[w]], max_rank=32, b_dtype=F32, compact=True, device=DEVICE)
    _poison_padding(slots, 8)
    x = torch.randn(2, 64, generator=gen)
    out = torch.zeros(2, 32, device=DEVICE)
    flylora_apply(out, x.to(DEVICE), torch.zeros(2, dtype=torch.int32, device=DEVICE), slots, backend="triton")
    assert_close(out.cpu(), flylora_delta(x, torch.zeros(2, dtype=torch.long), [w]), F32)


@pytest.mark.parametrize("routing", ["signed", "magnitude"])
def test_triton_exact_ties_take_lowest_ranks(routing: str) -> None:
    """Triton's top-k is rounds of ``argmax(tie_break_left=True)``: on exact ties, the lowest rank indices."""
    slots = build_slots([[_tie_adapter(routing)]], max_rank=32, b_dtype=F32, device=DEVICE)
    x = torch.zeros(2, 16)
    x[:, 0] = 3.0
    out = torch.zeros(2, 4, device=DEVICE)
    flylora_apply(out, x.to(DEVICE), torch.zeros(2, dtype=torch.int32, device=DEVICE), slots, backend="triton")
    for t in range(2):
        assert tie_pairs(out[t].cpu(), 3.0) == {(0, 1)}


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU: the full case table is too slow for the interpreter")
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_gpu_full(case: Case) -> None:
    check_case(case, "triton", DEVICE)
