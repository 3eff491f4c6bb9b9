"""Several engine replicas: adapter affinity, failover past a dead replica, /ready, eviction from all."""

from __future__ import annotations

import httpx

from .helpers import assert_openai_error, free_port_url

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
    assert len(served) == 2 and all(len(urls) == 1 for urls in served.values())  # affinity held
    assert served[next(iter(served))] != served[list(served)[1]]  # and the two adapters were spread
    with gw.client(key) as c:
        assert c.delete("/v1/adapters/one").status_code == 204
    internal_one = next(m for m in served if m not in gw.gw.registry.all_internal_ids())
    assert a.state.unloads == [internal_one] and b.state.unloads == [internal_one]
