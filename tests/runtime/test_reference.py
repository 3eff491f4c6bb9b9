"""The pure-torch reference: the oracle, checked against first principles."""

from __future__ import annotations

import pytest
import torch

from flylora_runtime.training.random_adapters import sparse_A
from flylora_runtime.reference.ops import LayerAdapter, flylora_delta, flylora_delta_one, select_ranks


def _layer(seed: int, r=8, k=2, n_in=32, n_out=24, d_std=0.0, routing="signed", alpha=16.0) -> LayerAdapter:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(r, generator=g) * d_std
    return LayerAdapter(A=sparse_A(r, k, n_in, g), B=torch.randn(n_out, r, generator=g), d=d, top_k=k,
                        scaling=alpha / r, routing=routing)


def test_matches_the_formula_token_by_token():
    w = _layer(0, d_std=0.1)
    x = torch.randn(5, 32)
    got = flylora_delta_one(x, w)
    for t in range(5):
        y = w.A @ x[t]
        sel = torch.topk(y + w.d, w.top_k).indices
        m = torch.zeros(8)
        m[sel] = 1
        expected = w.scaling * (w.B @ (y * m))
        torch.testing.assert_close(got[t], expected, rtol=1e-5, atol=1e-6)
        # only k columns of B are needed
        torch.testing.assert_close(got[t], w.scaling * (w.B[:, sel] @ y[sel]), rtol=1e-5, atol=1e-6)


def test_bias_enters_selection_only():
    w = _layer(1)
    x = torch.randn(4, 32)
    y = x @ w.A.T
    # a bias that forces ranks 0 and 1 to win, whatever y is
    d = torch.zeros(8)
    d[:2] = 1e6
    biased = LayerAdapter(A=w.A, B=w.B, d=d, top_k=2, scaling=w.scaling)
    expected = w.scaling * (y[:, :2] @ w.B[:, :2].T)  # y unshifted: d is not added to the sum
    torch.testing.assert_close(flylora_delta_one(x, biased), expected, rtol=1e-5, atol=1e-6)


def test_signed_and_magnitude_routing_differ_where_they_should():
    y = torch.tensor([[3.0, -5.0, 1.0, -0.5]])
    d = torch.zeros(4)
    assert select_ranks(y, d, 1, "signed").nonzero()[:, 1].tolist() == [0]
    assert select_ranks(y, d, 1, "magnitude").nonzero()[:, 1].tolist() == [1]
    # when the largest values are also the largest magnitudes, both agree
    y2 = torch.tensor([[3.0, -1.0, 2.0, -0.5]])
    assert torch.equal(select_ranks(y2, d, 2, "signed"), select_ranks(y2, d, 2, "magnitude"))
    # end to end: the deltas differ on a batch with strongly negative projections
    w_s, w_m = _layer(2, routing="signed"), _layer(2, routing="magnitude")
    x = torch.randn(16, 32)
    assert not torch.allclose(flylora_delta_one(x, w_s), flylora_delta_one(x, w_m))


def test_top_k_equal_r_with_zero_bias_is_plain_lora():
    w = _layer(3, r=8, k=8)
    x = torch.randn(6, 32)
    torch.testing.assert_close(flylora_delta_one(x, w), w.scaling * (x @ w.A.T @ w.B.T), rtol=1e-5, atol=1e-5)


def test_per_row_batching_equals_one_adapter_at_a_time():
    adapters = [_layer(10, r=8, k=2, d_std=0.1), _layer(11, r=16, k=4, routing="magnitude"), _layer(12, r=4, k=1)]
    x = torch.randn(20, 32)
    idx = torch.tensor([0, 1, 2, -1, 1, 1, 0, -1, 2, 2, 0, 1, -1, 0, 2, 1, 0, 0, -1, 2])
    got = flylora_delta(x, idx, adapters)
    for t in range(20):
        if idx[t] < 0:
            assert torch.count_nonzero(got[t]) == 0, "rows with no adapter get exactly zero delta"
        else:
            torch.testing.assert_close(got[t:t + 1], flylora_delta_one(x[t:t + 1], adapters[idx[t]]))


def test_half_precision_input_computes_in_fp32():
    w = _layer(4)
    x = torch.randn(3, 32)
    got = flylora_delta_one(x.to(torch.bfloat16), w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, flylora_delta_one(x.to(torch.bfloat16).float(), w))


def test_ties_follow_torch_topk():
    y = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert select_ranks(y, torch.zeros(4), 2).sum() == 2
    expected = torch.zeros(1, 4, dtype=torch.bool).scatter_(-1, torch.topk(y, 2).indices, True)
    assert torch.equal(select_ranks(y, torch.zeros(4), 2), expected)


@pytest.mark.parametrize("bad", [0, 9])
def test_invalid_top_k(bad):
    with pytest.raises(ValueError, match="top_k"):
        select_ranks(torch.zeros(1, 8), torch.zeros(8), bad)


def test_index_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        flylora_delta(torch.zeros(2, 32), torch.tensor([0, 1]), [_layer(0)])
