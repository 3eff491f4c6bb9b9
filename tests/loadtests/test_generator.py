"""The load generator against a tiny fake upstream: every request accounted for, loopback only, Zipf's shape.

The fake upstream answers ``/v1/chat/completions`` by the ``model`` it is sent: ``ok`` streams ``max_tokens``
chunks, usage and ``[DONE]``; ``err500`` answers HTTP 500; ``cut`` streams one chunk and ends without
``[DONE]``; ``slow`` never answers (cancelled at the drain timeout); ``stall`` streams like ``ok`` with one
0.3 s pause before its third token (a stalled engine loop).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import Counter

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from loadtests.generator import LoadSpec, TargetNotLoopback, check_loopback, run_load
from loadtests.report import summarize
from loadtests.workload import Lengths, Popularity
from tests.server.helpers import ServerThread


async def _chat(request: Request):
    body = await request.json()
    model, n = body["model"], body["max_tokens"]
    if model == "err500":
        return JSONResponse({"error": {"message": "boom", "type": "InternalServerError", "param": None,
                                       "code": 500}}, status_code=500)

    def chunk(content: str) -> str:
        return "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": content}}]}) + "\n\n"

    async def stream():
        if model == "slow":
            await asyncio.sleep(30)
        for i in range(1 if model == "cut" else n):
            if model == "stall" and i == 2:
                await asyncio.sleep(0.3)
            yield chunk(f" t{i}")
            await asyncio.sleep(0.001)
        if model == "cut":
            return
        yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n}}) + "\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def upstream():
    server = ServerThread(Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"])])).start()
    yield server.url
    server.stop()


def _spec(url: str, **kw) -> LoadSpec:
    base = {"url": url, "api_key": "k", "models": ["ok", "err500", "cut", "slow"], "popularity": "uniform",
            "concurrency": 8, "duration_s": 1.5, "max_requests": 60, "drain_timeout_s": 1.0, "progress": False,
            "output_tokens": Lengths(3, 6), "prompt_words": Lengths(4, 8), "seed": 3}
    base.update(kw)
    return LoadSpec(**base)


def _check_accounting(result, max_requests: int) -> None:
    recs = result.records
    assert 0 < len(recs) <= max_requests
    assert [r.index for r in recs] == list(range(len(recs)))  # none lost: indices are dense
    assert len(result.ok) + len(result.failed) == len(recs)
    s = summarize(result)
    assert (s["issued"], s["ok"], s["failed"]) == (len(recs), len(result.ok), len(result.failed))
    for r in recs:
        assert r.end is not None
        if r.model == "ok":
            assert r.ok and r.error is None and r.status == 200
            assert r.output_tokens == r.max_tokens and r.ttft is not None
        else:
            assert not r.ok and r.error
        if r.model == "err500":
            assert r.status == 500 and r.error.startswith("HTTP 500")
        if r.model == "cut":
            assert r.status == 200 and r.error == "stream ended without [DONE]"
        if r.model == "slow":
            assert r.error.startswith("cancelled")


def test_closed_loop_accounts_for_every_request(upstream):
    result = asyncio.run(run_load(_spec(upstream, mode="closed")))
    _check_accounting(result, 60)
    assert {r.model for r in result.records} == {"ok", "err500", "cut", "slow"}


def test_open_loop_accounts_for_every_request(upstream):
    result = asyncio.run(run_load(_spec(upstream, mode="open", rate=40.0, max_requests=30)))
    _check_accounting(result, 30)
    assert len(result.records) == 30  # 40/s for 1.5 s offers ~60: the request bound stops it at 30
    assert summarize(result)["output_tokens"] == sum(r.max_tokens for r in result.records if r.model == "ok")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80", "http://127.9.9.9"])
def test_loopback_targets_accepted(url):
    check_loopback(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "https://192.0.2.1/v1",
                                 "http://0.0.0.0:8000", "http://[2001:db8::1]:80", "ftp://127.0.0.1", "127.0.0.1:8000"])
def test_non_loopback_targets_refused_before_any_request(url):
    with pytest.raises(TargetNotLoopback):
        check_loopback(url)
    with pytest.raises(TargetNotLoopback):
        asyncio.run(run_load(LoadSpec(url=url, api_key="k", models=["m"], progress=False)))


def test_zipf_probabilities_follow_the_power_law():
    pop = Popularity("zipf", 1000, alpha=1.0)
    harmonic = sum(1 / i for i in range(1, 1001))
    for i in (0, 1, 9, 99, 999):
        assert pop.probabilities[i] == pytest.approx(1 / ((i + 1) * harmonic))
    assert math.fsum(pop.probabilities) == pytest.approx(1.0)
    steeper = Popularity("zipf", 10, alpha=2.0)
    assert steeper.probabilities[0] / steeper.probabilities[1] == pytest.approx(4.0)


def test_zipf_samples_have_the_right_shape():
    pop, rng, n = Popularity("zipf", 100, alpha=1.0), random.Random(0), 200_000
    counts = Counter(pop.sample(rng) for _ in range(n))
    assert set(counts) <= set(range(100))
    for i in (0, 1, 2, 4, 9):  # frequent ranks: within 5 standard errors of the exact probability
        p = pop.probabilities[i]
        assert abs(counts[i] / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    # log-log slope of frequency vs rank over the top 20 ranks is -alpha
    xs = [math.log(i + 1) for i in range(20)]
    ys = [math.log(counts[i] / n) for i in range(20)]
    mx, my = sum(xs) / 20, sum(ys) / 20
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    assert slope == pytest.approx(-1.0, abs=0.05)


def test_single_and_uniform_popularity():
    rng = random.Random(1)
    assert {Popularity("single", 50).sample(rng) for _ in range(1000)} == {0}
    counts = Counter(Popularity("uniform", 4).sample(rng) for _ in range(40_000))
    assert all(abs(c / 40_000 - 0.25) < 0.01 for c in counts.values()) and len(counts) == 4
    with pytest.raises(ValueError):
        Popularity("pareto", 3)


def test_inter_token_gaps_show_a_stall_that_the_mean_time_per_token_hides(upstream):
    result = asyncio.run(run_load(_spec(upstream, models=["stall"], output_tokens=Lengths(40, 40), max_requests=4,
                                        concurrency=2)))
    assert len(result.ok) == 4
    for r in result.ok:
        assert len(r.itl) == r.output_tokens - 1  # one gap between each two tokens
        assert max(r.itl) >= 0.3 and sorted(r.itl)[-2] < 0.2  # the stall is one gap, the others are short
        assert r.tpot < 0.3 / 4  # the mean over 39 gaps averages it away
    s = summarize(result)
    assert s["max_itl_s"]["n"] == 4 and s["max_itl_s"]["p50"] >= 0.3
    assert s["itl_s"]["n"] == 4 * 39 and s["itl_s"]["p50"] < 0.1
