"""Several engine replicas: adapter affinity, failover past a dead replica, /ready, eviction from all."""

from __future__ import annotations

import json
import time

import httpx

from tests.server.helpers import assert_openai_error, free_port_url

BASE = "SmolLM2-135M-Instruct"


def test_dead_replica_fails_over_and_is_counted_with_fake_engine(make_engine, make_gateway):
    live = make_engine()
    dead = free_port_url()
    gw = make_gateway([dead, live.url])
    _, key = gw.new_tenant()
    client = gw.openai(key)
    for _ in range(3):
        assert client.completions.create(model=BASE, prompt="x", max_tokens=1).model == BASE
    assert len(live.state.requests) == 3
    metrics = httpx.get(gw.url + "/metrics").text
    # Tried once, then cooled down: later requests go straight to the live replica.
    assert f'flylora_gateway_upstream_errors_total{{engine="{dead}",kind="connect"}} 1.0' in metrics
    ready = httpx.get(gw.url + "/ready")
    assert ready.status_code == 200 and ready.json()["engines"] == {dead: False, live.url: True}


def test_all_replicas_dead_is_503_and_not_ready(make_gateway):
    gw = make_gateway([free_port_url(), free_port_url()])
    _, key = gw.new_tenant()
    with gw.client(key) as c:
        err = assert_openai_error(c.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 503)
    assert err["code"] == "engine_unavailable"
    assert gw.gw.limiter.in_flight == {}  # the slot was given back
    r = httpx.get(gw.url + "/ready")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    assert httpx.get(gw.url + "/health").status_code == 200


def test_unhealthy_engine_is_not_ready(make_engine, make_gateway):
    sick = make_engine()
    sick.state.health_status = 503
    gw = make_gateway([sick.url])
    assert httpx.get(gw.url + "/ready").status_code == 503


def test_adapter_requests_stick_to_one_replica_and_delete_evicts_everywhere_with_fake_engine(
        make_engine, make_gateway, tmp_path):
    a, b = make_engine(), make_engine()
    gw = make_gateway([a.url, b.url])
    _, key = gw.new_tenant()
    for name in ("one", "two"):
        assert gw.upload(key, name, tmp_path / name).status_code == 201
    client = gw.openai(key)
    for _ in range(4):
        for name in ("one", "two"):
            client.completions.create(model=name, prompt="x", max_tokens=1)
    served = {}
    for engine in (a, b):
        for body in engine.state.bodies():
            served.setdefault(body["model"], set()).add(engine.url)
    router = gw.gw.upstream.router
    assert served == {m: {router.home(m)} for m in served} and len(served) == 2  # each adapter at its home
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'flylora_gateway_routing_total{result="affinity_miss"} 2.0' in metrics  # first request of each
    assert 'flylora_gateway_routing_total{result="affinity_hit"} 6.0' in metrics
    with gw.client(key) as c:
        assert c.delete("/v1/adapters/one").status_code == 204
    internal_one = next(m for m in served if m not in gw.gw.registry.all_internal_ids())
    assert a.state.unloads == [internal_one] and b.state.unloads == [internal_one]


def test_stream_broken_before_its_first_chunk_is_retried_once_elsewhere_with_fake_engine(make_engine, make_gateway):
    sick, well = make_engine(), make_engine()
    sick.state.break_streams = "before_first_chunk"
    gw = make_gateway([sick.url, well.url])
    _, key = gw.new_tenant()
    client = gw.openai(key)
    for _ in range(2):  # base requests: least in flight, the first goes to the sick replica (then it cools down)
        text = "".join(c.choices[0].text for c in client.completions.create(
            model=BASE, prompt="x", max_tokens=3, stream=True) if c.choices)
        assert len(text.split()) == 3
    assert len(sick.state.requests) == 1 and len(well.state.requests) == 2
    metrics = httpx.get(gw.url + "/metrics").text
    assert f'flylora_gateway_upstream_errors_total{{engine="{sick.url}",kind="broken"}} 1.0' in metrics
    assert 'flylora_gateway_routing_total{result="failover"} 1.0' in metrics
    assert 'flylora_gateway_requests_total{endpoint="completions",status="200",tenant=' in metrics


def test_stream_broken_after_its_first_chunk_ends_with_a_clean_error_with_fake_engine(make_engine, make_gateway):
    sick, well = make_engine(), make_engine()
    sick.state.break_streams = "after_first_chunk"
    gw = make_gateway([sick.url, well.url])
    _, key = gw.new_tenant()
    with gw.client(key) as c:
        r = c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 3, "stream": True})
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["text"] and events[-1]["error"]["code"] == "bad_engine_response"
    assert len(sick.state.requests) == 1 and well.state.requests == []  # not retried: the client had data
    assert gw.gw.upstream.router.is_down(sick.url)  # the broken replica cools down
    assert gw.openai(key).completions.create(model=BASE, prompt="x", max_tokens=1).model == BASE
    assert len(well.state.requests) == 1


def test_dead_engine_is_ejected_by_the_health_check_and_readmitted_with_fake_engine(make_engine, make_gateway):
    a, b = make_engine(), make_engine()
    gw = make_gateway([a.url, b.url], health_check_interval_s=0.05, health_check_failures=2)
    router = gw.gw.upstream.router
    a.state.health_status = 503
    _wait(lambda: router.is_ejected(a.url))
    assert not router.is_ejected(b.url)
    _, key = gw.new_tenant()
    for _ in range(3):
        gw.openai(key).completions.create(model=BASE, prompt="x", max_tokens=1)
    assert len(a.state.requests) == 0 and len(b.state.requests) == 3
    a.state.health_status = 200
    _wait(lambda: not router.is_down(a.url))
    for _ in range(2):
        gw.openai(key).completions.create(model=BASE, prompt="x", max_tokens=1)
    assert len(a.state.requests) >= 1


def _wait(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
