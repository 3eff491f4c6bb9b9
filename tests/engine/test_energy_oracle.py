"""Each generated token's free energy, measured inside the running engine (fp32), against the transformers
oracle: same prompt, same adapter, the engine's greedy tokens teacher-forced through the oracle."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from flylora_runtime.reference.hf_oracle import attach_flylora
from tests.engine.helpers import PROMPTS, Oracle, make_adapter, unload

pytestmark = pytest.mark.slow
MAX_TOKENS = 24
BASE = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def oracle(demo_model_dir) -> Oracle:
    return Oracle(demo_model_dir)


@pytest.fixture(scope="module")
def adapters(oracle, flylora_engine):
    specs = {
        "fl-energy-a": dict(r=32, top_k=8, lora_alpha=64, d_std=0.05, b_std=0.03, seed=21),
        "fl-energy-b": dict(r=32, top_k=8, lora_alpha=64, d_std=0.05, b_std=0.06, seed=22, routing="magnitude"),
    }
    made = {name: make_adapter(oracle.base, flylora_engine.store, name, **s) for name, s in specs.items()}
    yield made
    for name in made:
        unload(flylora_engine.url, name)


def _complete(url: str, model: str, ids: list[int], stream: bool) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True,
            "request_id": uuid.uuid4().hex, "stream": stream}
    if not stream:
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        out = r.json()
        return {"id": out["id"], "tokens": out["choices"][0]["token_ids"]}
    tokens, answer_id = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                answer_id = chunk["id"]
                for choice in chunk["choices"]:
                    tokens += choice.get("token_ids") or []
    return {"id": answer_id, "tokens": tokens}


def oracle_stats(oracle: Oracle, adapters, name: str | None, prompt: list[int], tokens: list[int]) -> list[list[float]]:
    """[energy, max prob, entropy] of each generated token's logits, teacher-forced through the oracle."""
    fly = attach_flylora(oracle.model, adapters)
    try:
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad(), fly.rows([name]):
            logits = oracle.model(input_ids=ids).logits[0].double()
    finally:
        fly.detach()
    positions = logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    logp = torch.log_softmax(positions, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.stack([-torch.logsumexp(positions, dim=-1), logp.amax(-1).exp(), entropy], 1).tolist()


def test_every_tokens_energy_equals_the_oracle_within_1e3(oracle, adapters, flylora_engine):
    rows = [*adapters, None]
    prompts = [oracle.chat_ids(p) for p in PROMPTS[:4]]
    calls = [(name, ids, stream) for i, ids in enumerate(prompts) for name in rows for stream in (i % 2 == 1,)]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:  # one concurrent batch: adapters and base mixed
        answers = list(pool.map(lambda c: _complete(flylora_engine.url, c[0] or BASE, c[1], c[2]), calls))
    queries = [{"id": a["id"], "tokens": len(a["tokens"])} for a in answers]
    r = httpx.post(flylora_engine.url + "/flylora/energy", json={"requests": queries, "detail": True}, timeout=60)
    r.raise_for_status()
    got = r.json()
    assert got["missing"] == []
    worst = 0.0
    for (name, ids, _), answer in zip(calls, answers):
        result = got["results"][answer["id"]]
        assert result["sequences"] == 1 and result["tokens"] == len(answer["tokens"]) > 0
        stats = result["per_token"][0]
        expected = oracle_stats(oracle, adapters, name, ids, answer["tokens"])
        diffs = [abs(a[0] - b[0]) for a, b in zip(stats, expected)]
        worst = max(worst, *diffs)
        assert max(diffs) < 1e-3, f"{name or 'base'}: token energies differ by up to {max(diffs):.2e}"
        assert result["energy"] == pytest.approx(sum(r[0] for r in stats) / len(stats), abs=1e-6)
        # the baselines come from the same logits
        assert max(abs(a[1] - b[1]) for a, b in zip(stats, expected)) < 1e-4
        assert max(abs(a[2] - b[2]) for a, b in zip(stats, expected)) < 1e-3
    # the adapters must move the energies, or the comparison proves little
    means = {}
    for (name, _, _), answer in zip(calls, answers):
        means.setdefault(name, []).append(got["results"][answer["id"]]["energy"])
    assert len({round(sum(v) / len(v), 2) for v in means.values()}) == len(rows)
    print(f"largest per-token energy difference from the oracle: {worst:.2e}")
    # each answer is handed out once
    again = httpx.post(flylora_engine.url + "/flylora/energy", json={"requests": queries[:2]}, timeout=60).json()
    assert again == {"results": {}, "missing": [q["id"] for q in queries[:2]]}


def test_the_energy_route_refuses_malformed_bodies(flylora_engine):
    r = httpx.post(flylora_engine.url + "/flylora/energy", json={"requests": "x"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_measuring_can_be_paused_at_run_time_and_reports_its_cost(oracle, flylora_engine):
    url = flylora_engine.url
    ids = oracle.chat_ids(PROMPTS[0])
    try:
        before = httpx.post(url + "/flylora/energy/control", timeout=60).json()
        assert before["enabled"] is True and before["steps"] > 0 and before["busy_seconds"] > 0
        assert before["entropy"] is True  # the session's engine runs with FLYLORA_ENERGY=full (conftest)
        assert httpx.post(url + "/flylora/energy/control", json={"enabled": False}, timeout=60).json()["enabled"] is False
        paused = _complete(url, BASE, ids, stream=False)
        got = httpx.post(url + "/flylora/energy", json={"requests": [{"id": paused["id"]}]}, timeout=60).json()
        assert got["missing"] == [paused["id"]]
        assert httpx.post(url + "/flylora/energy/control", json={"enabled": True}, timeout=60).json()["enabled"]
        measured = _complete(url, BASE, ids, stream=False)
        got = httpx.post(url + "/flylora/energy", json={"requests": [{"id": measured["id"]}]}, timeout=60).json()
        assert got["results"][measured["id"]]["tokens"] == len(measured["tokens"])
        after = httpx.post(url + "/flylora/energy/control", json={}, timeout=60).json()
        assert after["steps"] >= before["steps"] + len(measured["tokens"])
    finally:
        httpx.post(url + "/flylora/energy/control", json={"enabled": True}, timeout=60)
