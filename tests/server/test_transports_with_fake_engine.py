"""Both engine-client transports (httpx's own pool, and httpx over aiohttp) keep the same contract:
streaming with the caller's model, disconnect aborts upstream, failover past a dead replica."""

from __future__ import annotations

import time

import pytest

from .helpers import free_port_url

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
