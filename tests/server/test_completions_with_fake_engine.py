"""/v1/chat/completions, /v1/completions, /v1/models through the gateway with the official openai client,
against the fake engine test double: the engine sees internal ids, the caller only its own names."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.server.helpers import assert_openai_error

BASE = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture
def with_adapter(gateway, tenant, tmp_path):
    """A tenant (name, key, internal id) owning adapter ``support``."""
    name, key = tenant
    assert gateway.upload(key, "support", tmp_path / "a").status_code == 201
    tid = gateway.gw.registry.tenant_for_key(key).id
    return name, key, gateway.gw.registry.get_adapter(tid, "support").internal_id


def test_chat_with_adapter_rewrites_model_both_ways_with_fake_engine(gateway, engine, with_adapter):
    _, key, internal = with_adapter
    out = gateway.openai(key).chat.completions.create(model="support", messages=MESSAGES, max_tokens=4)
    assert out.model == "support"
    assert out.choices[0].message.content.count(" w") == 4
    assert out.usage.completion_tokens == 4
    sent = engine.state.bodies("/v1/chat/completions")[-1]
    assert sent["model"] == internal
    assert sent["messages"] == MESSAGES and sent["max_tokens"] == 4


def test_completions_with_base_model_with_fake_engine(gateway, engine, tenant):
    out = gateway.openai(tenant[1]).completions.create(model=BASE, prompt="Once", max_tokens=2, n=2)
    assert out.model == BASE
    assert [c.text.count(" w") for c in out.choices] == [2, 2]
    assert engine.state.bodies("/v1/completions")[-1]["model"] == BASE


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_passes_chunks_with_callers_model_and_usage_with_fake_engine(gateway, engine, with_adapter, endpoint):
    _, key, internal = with_adapter
    client = gateway.openai(key)
    if endpoint == "chat":
        full = client.chat.completions.create(model="support", messages=MESSAGES, max_tokens=5, temperature=0)
        chunks = list(client.chat.completions.create(model="support", messages=MESSAGES, max_tokens=5,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expected = full.choices[0].message.content
        path = "/v1/chat/completions"
    else:
        full = client.completions.create(model="support", prompt="Once", max_tokens=5, temperature=0)
        chunks = list(client.completions.create(model="support", prompt="Once", max_tokens=5, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected = full.choices[0].text
        path = "/v1/completions"
    assert text == expected
    assert len([c for c in chunks if c.choices]) >= 5  # passed through chunk by chunk, not merged
    assert {c.model for c in chunks} == {"support"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    sent = engine.state.bodies(path)[-1]
    assert sent["model"] == internal and sent["stream"] is True


def test_stream_without_include_usage_hides_usage_but_engine_is_asked_with_fake_engine(gateway, engine, tenant):
    with gateway.client(tenant[1]) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json={"model": BASE, "messages": MESSAGES, "max_tokens": 3, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("usage" not in p for p in payloads)
    assert engine.state.bodies("/v1/chat/completions")[-1]["stream_options"] == {
        "include_usage": True, "continuous_usage_stats": True}


def test_raw_stream_never_contains_internal_id_with_fake_engine(gateway, with_adapter):
    _, key, internal = with_adapter
    with gateway.client(key) as c:
        raw = c.post("/v1/completions", json={"model": "support", "prompt": "x", "max_tokens": 3, "stream": True,
                                              "stream_options": {"include_usage": True}}).text
        plain = c.post("/v1/completions", json={"model": "support", "prompt": "x", "max_tokens": 3}).text
    assert internal not in raw and internal not in plain
    assert '"model":"support"' in raw and '"model":"support"' in plain


def test_engine_errors_pass_through_without_internal_id_with_fake_engine(gateway, with_adapter):
    _, key, internal = with_adapter
    with gateway.client(key) as c:
        r = c.post("/v1/completions", json={"model": "support", "prompt": "x", "fake_status": 400})
    assert r.status_code == 400
    assert internal not in r.text and "`support`" in r.json()["error"]["message"]


def test_client_disconnect_aborts_upstream_stream_with_fake_engine(gateway, engine, tenant):
    name, key = tenant
    aborted_before = len(engine.state.aborted)
    with gateway.client(key) as c:
        with c.stream("POST", "/v1/completions", json={
                "model": BASE, "prompt": "long", "max_tokens": 400, "stream": True, "fake_chunk_delay_s": 0.05}) as r:
            it = r.iter_bytes()
            assert b"data: " in next(it)
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 5
    while len(engine.state.aborted) == aborted_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(engine.state.aborted) == aborted_before + 1
    # The slot was given back and the request recorded as closed by the client.
    while gateway.gw.limiter.in_flight.get(gateway.gw.registry.tenant_for_key(key).id) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gateway.gw.limiter.in_flight.get(gateway.gw.registry.tenant_for_key(key).id) is None
    metrics = httpx.get(gateway.url + "/metrics").text
    assert f'flylora_gateway_requests_total{{endpoint="completions",status="499",tenant="{name}"}} 1.0' in metrics


def test_client_disconnect_during_silent_prefill_aborts_upstream_with_fake_engine(gateway, engine, tenant):
    """The engine sends nothing for a while (a long prefill): the disconnect is noticed anyway."""
    _, key = tenant
    aborted_before = len(engine.state.aborted)
    with gateway.client(key) as c:
        with c.stream("POST", "/v1/completions", json={
                "model": BASE, "prompt": "p", "max_tokens": 2, "stream": True, "fake_chunk_delay_s": 3}) as r:
            assert r.status_code == 200
    deadline = time.monotonic() + 2.5
    while len(engine.state.aborted) == aborted_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(engine.state.aborted) == aborted_before + 1


def test_models_lists_base_and_only_callers_adapters(gateway, tmp_path):
    (_, k1), (_, k2) = gateway.new_tenant(), gateway.new_tenant()
    assert gateway.upload(k1, "mine", tmp_path / "a").status_code == 201
    assert gateway.upload(k2, "theirs", tmp_path / "b").status_code == 201
    models = {m.id: m for m in gateway.openai(k1).models.list()}
    assert set(models) == {BASE, "mine"}
    assert models["mine"].model_extra["parent"] == BASE
    assert models[BASE].model_extra["parent"] is None


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"messages": MESSAGES}).encode(), "model"),
    (json.dumps({"model": "", "messages": MESSAGES}).encode(), "model"),
    (json.dumps({"model": BASE, "messages": MESSAGES, "max_tokens": 4097}).encode(), "max_tokens"),
    (json.dumps({"model": BASE, "messages": MESSAGES, "max_completion_tokens": 5000}).encode(),
     "max_completion_tokens"),
    (json.dumps({"model": BASE, "messages": MESSAGES, "max_tokens": "10"}).encode(), "max_tokens"),
    (json.dumps({"model": BASE, "messages": MESSAGES, "n": 17}).encode(), "n"),
    (json.dumps({"model": BASE, "messages": MESSAGES, "stream": "yes"}).encode(), "stream"),
    (json.dumps({"model": BASE, "messages": []}).encode(), "messages"),
    (json.dumps({"model": BASE, "messages": [{"role": "user", "content": "x" * 8001}]}).encode(), "messages"),
])
def test_bad_chat_requests_are_400_and_never_reach_the_engine(gateway, engine, tenant, body, param):
    before = len(engine.state.requests)
    with gateway.client(tenant[1]) as c:
        r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400)
    assert err["param"] == param
    assert len(engine.state.requests) == before


def test_prompt_over_cap_on_completions_is_400(gateway, engine, tenant):
    before = len(engine.state.requests)
    with gateway.client(tenant[1]) as c:
        r = c.post("/v1/completions", json={"model": BASE, "prompt": ["x" * 5000, "y" * 3001]})
    assert assert_openai_error(r, 400)["param"] == "prompt"
    assert len(engine.state.requests) == before


def test_max_tokens_at_cap_is_accepted_not_clamped(gateway, engine, tenant):
    out = gateway.openai(tenant[1]).completions.create(model=BASE, prompt="x", max_tokens=4096)
    assert engine.state.bodies("/v1/completions")[-1]["max_tokens"] == 4096
    assert out.usage.completion_tokens == 4096


def test_body_over_limit_is_413(gateway, engine, tenant):
    before = len(engine.state.requests)
    with gateway.client(tenant[1]) as c:
        r = c.post("/v1/completions", content=b"{" + b" " * (64 * 1024) + b"}",
                   headers={"content-type": "application/json"})
    assert_openai_error(r, 413)
    assert len(engine.state.requests) == before


def test_unknown_model_is_404_like_openai(gateway, tenant):
    with gateway.client(tenant[1]) as c:
        err = assert_openai_error(c.post("/v1/chat/completions", json={"model": "nope", "messages": MESSAGES}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
