"""Both engine-client transports (httpx's own pool, and httpx over aiohttp) keep the same contract:
streaming with the caller's model, disconnect aborts upstream, failover past a dead replica."""

from __future__ import annotations

import time

import pytest

from tests.server.helpers import free_port_url

BASE = "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("transport", ["httpcore", "aiohttp"])
def test_transport_keeps_the_contract_with_fake_engine(make_engine, make_gateway, tmp_path, transport):
    if transport == "aiohttp":
        pytest.importorskip("httpx_aiohttp", reason="httpx-aiohttp not installed")
    live = make_engine()
    gw = make_gateway([free_port_url(), live.url], engine_http_transport=transport)
    _, key = gw.new_tenant()
    assert gw.upload(key, "tx", tmp_path / "a").status_code == 201
    chunks = list(gw.openai(key).chat.completions.create(
        model="tx", messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {"tx"} and chunks[-1].usage.completion_tokens == 3
    assert live.state.bodies()[-1]["model"].startswith("fl-")
    with gw.client(key) as c:
        with c.stream("POST", "/v1/completions", json={"model": BASE, "prompt": "p", "max_tokens": 300,
                                                       "stream": True, "fake_chunk_delay_s": 0.05}) as r:
            assert b"data: " in next(r.iter_bytes())
    deadline = time.monotonic() + 5
    while not live.state.aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(live.state.aborted) == 1


@pytest.mark.parametrize("fast_path", [True, False])
def test_fast_path_and_fastapi_routes_behave_alike_with_fake_engine(make_engine, make_gateway, tmp_path, fast_path):
    fake = make_engine()
    gw = make_gateway([fake.url], completion_fast_path=fast_path)
    _, key = gw.new_tenant(max_concurrency=1)
    assert gw.upload(key, "p", tmp_path / "a").status_code == 201
    client = gw.openai(key)
    out = client.completions.create(model="p", prompt="x", max_tokens=2)
    chunks = list(client.chat.completions.create(model="p", messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=2, stream=True))
    assert out.model == "p" and {c.model for c in chunks} == {"p"}
    with gw.client(key) as c:
        assert c.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}).json() == {
            "error": {"message": "The request body is not valid JSON: EOF while parsing an object at line 1 column 1.",
                      "type": "invalid_request_error", "param": None, "code": "invalid_request"}}
        assert c.post("/v1/chat/completions", json={"model": "q", "messages": [{"role": "user", "content": "x"}]}
                      ).json()["error"]["code"] == "model_not_found"
    with gw.client("bad") as c:
        assert c.post("/v1/completions", json={"model": "p", "prompt": "x"}).status_code == 401
