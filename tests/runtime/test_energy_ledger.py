"""The engine's token statistics (free energy, max prob, entropy) and its per-request ledger, without vLLM."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from flylora_runtime.vllm_plugin.energy import EnergyLedger, split_id, token_stats
from flylora_runtime.vllm_plugin.energy_route import parse_queries


def reference_stats(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    entropy = -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1)
    return torch.stack([-torch.logsumexp(x, -1), p.amax(-1), entropy], dim=1)


@pytest.mark.parametrize("rows", [1, 5, 16, 37])
def test_token_stats_match_a_float64_reference(rows):
    torch.manual_seed(rows)
    logits = torch.randn(rows, 4999) * 4 + torch.randn(rows, 1) * 10  # rows at different offsets
    got = token_stats(logits)
    assert got.dtype == torch.float32 and got.shape == (rows, 3)
    torch.testing.assert_close(got.double(), reference_stats(logits), rtol=0, atol=2e-5)


def test_token_stats_of_bf16_logits_are_computed_in_fp32():
    torch.manual_seed(0)
    logits = (torch.randn(4, 3000) * 3).to(torch.bfloat16)
    torch.testing.assert_close(token_stats(logits).double(), reference_stats(logits.float()), rtol=0, atol=2e-5)


def test_masked_logits_count_as_zero_probability_not_nan():
    logits = torch.tensor([[0.0, 1.0, float("-inf"), 2.0], [3.0, float("-inf"), float("-inf"), float("-inf")]])
    got = token_stats(logits)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference_stats(logits), rtol=0, atol=1e-6)
    assert got[1].tolist() == pytest.approx([-3.0, 1.0, 0.0], abs=1e-6)  # one possible token: p=1, H=0


def test_without_entropy_the_energy_and_max_prob_are_the_same_and_entropy_is_nan():
    torch.manual_seed(3)
    logits = torch.randn(7, 3000) * 5
    full, lean = token_stats(logits, entropy=True), token_stats(logits, entropy=False)
    assert torch.equal(full[:, :2], lean[:, :2]) and torch.isnan(lean[:, 2]).all()
    ledger = EnergyLedger()
    ledger.record(["chatcmpl-e-abcdefgh"], lean[:1].tolist())
    ledger.finish(["chatcmpl-e-abcdefgh"])
    got = ledger.take([("chatcmpl-e", None)])["results"]["chatcmpl-e"]
    assert got["entropy"] is None and got["energy"] == pytest.approx(lean[0, 0].item())


def test_energy_is_minus_logsumexp_and_known_values():
    # uniform over V tokens: E = -(c + log V), max prob 1/V, entropy log V
    got = token_stats(torch.full((1, 1000), 2.5))[0].tolist()
    assert got == pytest.approx([-(2.5 + math.log(1000)), 1e-3, math.log(1000)], rel=1e-6)


@pytest.mark.parametrize("internal, answer, seq", [
    ("chatcmpl-0123456789abcdef0123456789abcdef-1a2b3c4d", "chatcmpl-0123456789abcdef0123456789abcdef", "/"),
    ("2_chatcmpl-abcdef-1a2b3c4d", "chatcmpl-abcdef", "/2"),  # n > 1: one child per choice
    ("cmpl-abcdef-3-1a2b3c4d", "cmpl-abcdef", "3/"),  # a list of prompts: one sub-request each
    ("1_cmpl-abcdef-12-1a2b3c4d", "cmpl-abcdef", "12/1"),
    ("chatcmpl-abcdef", "chatcmpl-abcdef", "/"),  # VLLM_DISABLE_REQUEST_ID_RANDOMIZATION: no suffix
])
def test_internal_ids_map_to_the_answer_id(internal, answer, seq):
    assert split_id(internal) == (answer, seq)


def _rows(*energies):
    return [[e, 0.5, 1.0] for e in energies]


def test_ledger_collects_steps_and_hands_out_each_request_once():
    ledger = EnergyLedger()
    ledger.record(["chatcmpl-a-11111111", "chatcmpl-b-22222222"], _rows(-10.0, -20.0))
    ledger.record(["chatcmpl-a-11111111", "chatcmpl-b-22222222"], _rows(-12.0, -22.0))
    ledger.record(["chatcmpl-b-22222222"], _rows(-24.0))
    ledger.finish(["chatcmpl-a-11111111"])
    out = ledger.take([("chatcmpl-a", None), ("chatcmpl-b", None), ("chatcmpl-zzz", None)])
    assert out["results"]["chatcmpl-a"] == {"tokens": 2, "sequences": 1, "energy": -11.0, "max_prob": 0.5,
                                             "entropy": 1.0}
    # b has not been reported finished yet (the worker hears of it a step later): still handed out, whole
    assert out["results"]["chatcmpl-b"]["tokens"] == 3
    assert out["results"]["chatcmpl-b"]["energy"] == pytest.approx(-22.0)
    assert out["missing"] == ["chatcmpl-zzz"]
    # handed out once; a late row of the claimed running request is dropped, and forgotten at its finish
    ledger.record(["chatcmpl-b-22222222"], _rows(-99.0))
    ledger.finish(["chatcmpl-b-22222222"])
    assert ledger.take([("chatcmpl-a", None), ("chatcmpl-b", None)])["missing"] == ["chatcmpl-a", "chatcmpl-b"]
    assert not ledger.running and not ledger.claimed and not ledger.finished and ledger.finished_tokens == 0


def test_tokens_cut_a_single_sequence_to_what_the_client_received():
    ledger = EnergyLedger()
    for e in (-1.0, -2.0, -3.0, -40.0):  # the last one: a step past a stop string
        ledger.record(["chatcmpl-s-abcdefgh"], _rows(e))
    ledger.finish(["chatcmpl-s-abcdefgh"])
    got = ledger.take([("chatcmpl-s", 3)], detail=True)["results"]["chatcmpl-s"]
    assert got["tokens"] == 3 and got["energy"] == pytest.approx(-2.0)
    assert got["per_token"] == [[[-1.0, 0.5, 1.0], [-2.0, 0.5, 1.0], [-3.0, 0.5, 1.0]]]


def test_several_choices_are_averaged_over_all_their_tokens():
    ledger = EnergyLedger()
    ledger.record(["0_chatcmpl-n-aaaaaaaa", "1_chatcmpl-n-aaaaaaaa"], _rows(-1.0, -5.0))
    ledger.record(["1_chatcmpl-n-aaaaaaaa"], _rows(-6.0))
    ledger.finish(["0_chatcmpl-n-aaaaaaaa", "1_chatcmpl-n-aaaaaaaa"])
    got = ledger.take([("chatcmpl-n", 2)])["results"]["chatcmpl-n"]  # tokens ignored with several sequences
    assert got["sequences"] == 2 and got["tokens"] == 3 and got["energy"] == pytest.approx(-4.0)


def test_unclaimed_requests_are_bounded_oldest_first():
    ledger = EnergyLedger(max_finished=3, max_finished_tokens=10)
    for i in range(5):
        rid = f"chatcmpl-x{i}-abcdefgh"
        ledger.record([rid], _rows(-1.0))
        ledger.finish([rid])
    assert list(ledger.finished) == ["chatcmpl-x2", "chatcmpl-x3", "chatcmpl-x4"]
    big = "chatcmpl-big-abcdefgh"
    for _ in range(9):
        ledger.record([big], _rows(-1.0))
    ledger.finish([big])
    assert list(ledger.finished) == ["chatcmpl-x4", "chatcmpl-big"] and ledger.finished_tokens == 10


def test_deferred_steps_are_folded_before_finishing_and_taking():
    ledger = EnergyLedger()
    ledger.defer(["chatcmpl-d-abcdefgh"], token_stats(torch.zeros(1, 10)))
    ledger.finish(["chatcmpl-d-abcdefgh"])  # the final step's rows arrive with the next step
    got = ledger.take([("chatcmpl-d", None)])["results"]["chatcmpl-d"]
    assert got["tokens"] == 1 and got["energy"] == pytest.approx(-math.log(10), abs=1e-6)


@pytest.mark.parametrize("body", [
    None, [], {"requests": "x"}, {"requests": [{"id": ""}]}, {"requests": [{"id": 3}]},
    {"requests": [{"id": "a", "tokens": -1}]}, {"requests": [{"id": "a", "tokens": True}]},
    {"requests": [{"id": "a"}], "detail": "yes"}, {"requests": [{"id": "a"}] * 4097},
])
def test_the_route_refuses_malformed_queries(body):
    assert isinstance(parse_queries(body), str)


def test_the_route_parses_queries():
    assert parse_queries({"requests": [{"id": "a", "tokens": 3}, {"id": "b"}], "detail": True}) == (
        [("a", 3), ("b", None)], True)


def test_control_pauses_and_reports():
    ledger = EnergyLedger()
    assert ledger.control() == {"enabled": True, "entropy": False, "steps": 0, "busy_seconds": 0.0, "running": 0,
                                "unclaimed": 0}
    assert ledger.control(entropy=True)["entropy"] is True and ledger.entropy is True
    assert ledger.control(False)["enabled"] is False and ledger.measuring is False
    assert ledger.control()["enabled"] is False
    assert ledger.control(True)["enabled"] is True


class _SilentEngineClient:
    """An engine client whose engine core never answers (as when it shuts down under the call)."""

    async def collective_rpc(self, method, timeout=None, args=()):
        await asyncio.Event().wait()


def test_the_route_answers_503_when_the_engine_core_never_replies(monkeypatch):
    from flylora_runtime.vllm_plugin import energy_route

    monkeypatch.setattr(energy_route, "RPC_TIMEOUT_S", 0.05)
    reply = asyncio.run(energy_route.call_worker(_SilentEngineClient(), "x", ()))
    assert reply.status_code == 503 and b"did not answer" in reply.body
