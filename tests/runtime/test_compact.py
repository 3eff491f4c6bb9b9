"""The compact engine-ready form round-trips bit for bit to the authors' form."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from flylora_runtime.weights.dense import FlyLoRAAdapter, ModuleWeights
from flylora_runtime.format.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from flylora_runtime.weights.compact import CompactAdapter, compact_module, size_report
from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter, sparse_A
from flylora_runtime.format.modelspec import LLAMA_3_1_8B


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_authors_to_compact_to_authors_is_bit_exact(tmp_path, tiny_adapter_dir, tiny_base):
    original = FlyLoRAAdapter.load(tiny_adapter_dir, tiny_base)
    compact = CompactAdapter.from_adapter(original)
    assert not any(c.dense for c in compact.modules.values()), "r=8, k=2 A is a quarter dense: stored sparse"
    compact.save(tmp_path / "c.safetensors")
    back = CompactAdapter.load(tmp_path / "c.safetensors").to_adapter()
    back.save(tmp_path / "back")
    a, b = load_file(tiny_adapter_dir / WEIGHTS_NAME), load_file(tmp_path / "back" / WEIGHTS_NAME)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert torch.equal(_bits(a[k]), _bits(b[k])), k
    assert json.loads((tmp_path / "back" / CONFIG_NAME).read_text()) == json.loads(
        (tiny_adapter_dir / CONFIG_NAME).read_text())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_negative_zero_and_uneven_rows_survive(dtype):
    A = torch.zeros(4, 40, dtype=dtype)
    A[0, 3] = -0.0
    A[0, 39] = 1.5
    A[2, :7] = torch.arange(1, 8, dtype=dtype)
    w = ModuleWeights(A=A, B=torch.randn(5, 4).to(dtype), d=torch.zeros(4, dtype=dtype))
    c = compact_module(w)
    assert c.a_nnz.tolist() == [2, 0, 7, 0]
    assert c.a_idx.shape == (4, 7) and c.a_idx[0, :2].tolist() == [3, 39]
    assert torch.equal(_bits(c.to_dense_A()), _bits(A))


def test_dense_A_falls_back_to_dense_storage():
    A = torch.randn(8, 64)
    c = compact_module(ModuleWeights(A=A, B=torch.randn(3, 8), d=torch.zeros(8)))
    assert c.dense and torch.equal(c.to_dense_A(), A)


def test_merged_adapter_rows_hold_the_union_of_nonzeros():
    gen = torch.Generator().manual_seed(0)
    merged = (sparse_A(32, 8, 256, gen) + sparse_A(32, 8, 256, gen)) / 2
    c = compact_module(ModuleWeights(A=merged, B=torch.zeros(4, 32), d=torch.zeros(32)))
    assert int(c.a_nnz.max()) > 64 and torch.equal(c.to_dense_A(), merged)


def test_padded_entries_contribute_nothing():
    gen = torch.Generator().manual_seed(1)
    A = sparse_A(8, 2, 64, gen)
    A[0, 5:] = 0  # row 0 now has fewer nonzeros than the others: padded
    c = compact_module(ModuleWeights(A=A, B=torch.zeros(2, 8), d=torch.zeros(8)))
    x = torch.randn(3, 64)
    y_sparse = (x[:, c.a_idx.long()] * c.a_val).sum(-1)  # uses every padded entry
    torch.testing.assert_close(y_sparse, x @ A.T, rtol=1e-5, atol=1e-6)


def test_index_dtype_widens_past_int16():
    A = torch.zeros(2, 40000)
    A[0, 39999] = 1.0
    c = compact_module(ModuleWeights(A=A, B=torch.zeros(1, 2), d=torch.zeros(2)))
    assert c.a_idx.dtype == torch.int32 and int(c.a_idx[0, 0]) == 39999


def test_size_report_paper_config():
    rep = size_report(LLAMA_3_1_8B, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      r=32, top_k=8)
    assert round(rep["numbers"] / 1e6, 1) == 83.9  # FLYLORA.md: 83.9 M numbers
    assert round(rep["authors_bytes"] / 1e6) == 336
    assert 0.69 < rep["ratio"] < 0.71


def test_size_report_matches_actual_compact_bytes(tiny_base):
    targets = ("q_proj", "down_proj")
    adapter = generate_adapter(tiny_base, GenerateSpec(r=8, top_k=2, targets=targets, seed=5))
    rep = size_report(tiny_base, targets, r=8, top_k=2)
    assert CompactAdapter.from_adapter(adapter).nbytes() == rep["compact_bytes"]
    assert sum(t.numel() * 4 for t in adapter.state_dict().values()) == rep["authors_bytes"]
