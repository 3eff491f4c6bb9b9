"""A hostile tenant against the gateway's request path, over real HTTP with the fake engine test double behind
it. Each test mounts one attack and checks the answer (status, OpenAI's error shape), what reached the engine,
that nothing stayed held (slots, tokens), and that another tenant is still served."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.server.helpers import assert_openai_error, free_port_url

BASE = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "Say something."}]
FROZEN = 1000.0  # a limiter clock that never moves: token balances are exact


def tenant_id(gw, key: str) -> int:
    return gw.gw.registry.tenant_for_key(key).id


def wait_released(gw, key: str, timeout: float = 10.0) -> None:
    """Wait until the tenant holds no concurrency slot, and check the in-flight gauge agrees."""
    tid, name = tenant_id(gw, key), gw.gw.registry.tenant_for_key(key).name
    deadline = time.monotonic() + timeout
    while gw.gw.limiter.in_flight.get(tid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gw.gw.limiter.in_flight.get(tid) is None
    assert gw.gw.metrics.in_flight_by[(name,)]._value.get() == 0


def balance(gw, key: str) -> float:
    return gw.gw.limiter.buckets[tenant_id(gw, key)].level


def assert_others_served(gw) -> None:
    _, other = gw.new_tenant()
    with gw.client(other) as c:
        r = c.post("/v1/chat/completions", json={"model": BASE, "messages": MSG, "max_tokens": 2})
    assert r.status_code == 200, r.text


def head_only(url: str, path: str, key: str, length: int) -> int:
    """Send a request's head announcing ``length`` body bytes, send none, and return the status answered."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode())
        data = s.recv(65536)
    return int(data.split(b" ")[1])


# --- malformed bodies --------------------------------------------------------------------------------------------
BOMBS = {
    "deep nesting": b'{"model":"' + BASE.encode() + b'","messages":' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    "deep objects": b'{"model":"' + BASE.encode() + b'","messages":[{"role":"user","content":' + b'{"a":' * 8000
                    + b"1" + b"}" * 8000 + b"}]}",
    "a 5,000-digit integer": b'{"model":"' + BASE.encode() + b'","messages":[],"seed":' + b"7" * 5000 + b"}",
    "a 50,000-digit integer": b'{"model":"' + BASE.encode() + b'","max_tokens":' + b"9" * 50_000 + b"}",
    "a lone surrogate as the model": b'{"model":"\\ud800","messages":[{"role":"user","content":"x"}]}',
    "invalid UTF-8": b'{"model":"\xff\xfe","messages":[{"role":"user","content":"x"}]}',
    "NaN": b'{"model":"' + BASE.encode() + b'","messages":[{"role":"user","content":"x"}],"top_p":NaN}',
    "a boolean where a list belongs": json.dumps({"model": BASE, "messages": True}).encode(),
    "a list where a string belongs": json.dumps({"model": [BASE], "messages": MSG}).encode(),
    "a string where an integer belongs": json.dumps({"model": BASE, "messages": MSG, "n": "2"}).encode(),
    "an object where a string belongs": json.dumps({"model": BASE, "messages": MSG, "stop": {"a": 1}}).encode(),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_malformed_json_is_a_400_and_reaches_nothing_with_fake_engine(gateway, engine, tenant, name):
    before = len(engine.state.requests)
    with gateway.client(tenant[1]) as c:
        r = c.post("/v1/chat/completions", content=BOMBS[name], headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    assert len(engine.state.requests) == before
    wait_released(gateway, tenant[1])
    assert_others_served(gateway)


# --- the request policy ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,param", [
    ({"bad_words": [f"w{i}" for i in range(5000)]}, "bad_words"),
    ({"stop": [f"s{i}" for i in range(5000)]}, "stop"),
    ({"stop": "x" * 5000}, "stop"),
    ({"logit_bias": {str(i): 5 for i in range(2000)}}, "logit_bias"),
    ({"use_beam_search": True, "n": 4}, "use_beam_search"),
    ({"prompt_logprobs": 20}, "prompt_logprobs"),
    ({"min_tokens": 4096, "max_tokens": 16}, "min_tokens"),
    ({"chat_template": "{% for i in range(10**9) %}x{% endfor %}"}, "chat_template"),
    ({"priority": -(2**40)}, "priority"),
    ({"request_id": "another-tenants-request"}, "request_id"),
    ({"structured_outputs": {"regex": "(a|aa)*" * 50}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "(a+)+$"} for i in range(800)}}}}},
     "response_format"),
    ({"cache_salt": "0" * 64}, "cache_salt"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://169.254.169.254/latest/meta-data/"}}]}]}, "messages[0].content[0].image_url"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "d" * 8001}}]}, "messages"),
])
def test_costly_or_unknown_fields_are_refused_by_name_with_fake_engine(gateway, engine, tenant, extra, param):
    before = len(engine.state.requests)
    with gateway.client(tenant[1]) as c:
        r = c.post("/v1/chat/completions", json={"model": BASE, "messages": MSG, **extra})
    assert assert_openai_error(r, 400)["param"] == param
    assert len(engine.state.requests) == before
    assert_others_served(gateway)


def test_the_engine_gets_the_checked_fields_a_default_max_tokens_and_the_tenants_salt_with_fake_engine(
        gateway, engine, tenant):
    name, key = tenant
    with gateway.client(key) as c:
        assert c.post("/v1/chat/completions", json={"model": BASE, "messages": MSG, "temperature": 0.2}
                      ).status_code == 200
        chat = engine.state.bodies("/v1/chat/completions")[-1]
        assert c.post("/v1/completions", json={"model": BASE, "prompt": "p", "stream": True}).status_code == 200
        legacy = engine.state.bodies("/v1/completions")[-1]
    salt = chat.pop("cache_salt")
    request_id = chat.pop("request_id")  # the gateway's own id (quality monitoring), never the tenant's
    assert len(request_id) == 32 and request_id != legacy.get("request_id")
    assert chat == {"model": BASE, "messages": MSG, "temperature": 0.2, "max_tokens": 1024}
    assert legacy.pop("cache_salt") == salt and legacy["max_tokens"] == 16
    assert legacy["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert len(salt) == 64 and name not in salt


def test_tenants_never_share_a_prefix_cache_salt_with_fake_engine(gateway, engine):
    salts = {}
    for _ in range(3):
        name, key = gateway.new_tenant()
        for _ in range(2):
            with gateway.client(key) as c:
                assert c.post("/v1/completions", json={"model": BASE, "prompt": "same prefix"}).status_code == 200
            salts.setdefault(name, set()).add(engine.state.bodies("/v1/completions")[-1]["cache_salt"])
    assert all(len(s) == 1 for s in salts.values())  # stable per tenant: its own prefixes still hit
    assert len(set.union(*salts.values())) == 3  # one per tenant


# --- quotas -----------------------------------------------------------------------------------------------------
def test_tokens_are_reserved_while_a_request_runs_with_fake_engine(make_engine, make_gateway):
    engine = make_engine()
    gw = make_gateway([engine.url])
    gw.gw.limiter.clock = lambda: FROZEN
    _, key = gw.new_tenant(tokens_per_minute=1000)
    first: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: first.append(gw.client(key).post("/v1/completions", json={
        "model": BASE, "prompt": "x", "max_tokens": 1200, "fake_sleep_s": 2.0})))
    slow.start()
    while not engine.state.requests:
        time.sleep(0.01)
    assert balance(gw, key) == 1000 - (1 + 1200)  # held while it runs
    with gw.client(key) as c:  # a second request cannot start on the same balance
        r = c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1})
    assert assert_openai_error(r, 429)["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
    slow.join()
    assert first[0].status_code == 200 and len(engine.state.requests) == 1
    assert balance(gw, key) == 1000 - first[0].json()["usage"]["total_tokens"]


def test_a_reservation_is_settled_against_real_usage_with_fake_engine(make_engine, make_gateway):
    gw = make_gateway([make_engine().url])
    gw.gw.limiter.clock = lambda: FROZEN
    _, key = gw.new_tenant(tokens_per_minute=1000)
    out = gw.openai(key).completions.create(model=BASE, prompt="x", max_tokens=900,
                                            extra_body={"fake_completion_tokens": 10})
    assert out.usage.completion_tokens == 10
    assert balance(gw, key) == 1000 - out.usage.total_tokens  # the unused 890 came back


def test_a_stream_cut_short_is_charged_what_it_produced_with_fake_engine(make_engine, make_gateway):
    gw = make_gateway([make_engine().url])
    gw.gw.limiter.clock = lambda: FROZEN
    name, key = gw.new_tenant(tokens_per_minute=10_000)
    received = 0
    with gw.client(key) as c:
        with c.stream("POST", "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 400,
                                                        "stream": True, "fake_chunk_delay_s": 0.05}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    assert "usage" not in line  # the client did not ask for it
                    received += 1
                    if received == 5:
                        break
    wait_released(gw, key)
    charged = 10_000 - balance(gw, key)
    metrics = httpx.get(gw.url + "/metrics").text
    produced = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("flylora_gateway_completion_tokens_total") and f'tenant="{name}"' in line)
    assert charged == 1 + produced  # the prompt's token and what it produced, not the whole reservation
    assert produced >= received  # at least what the client read
    assert produced < 400  # cut short: the engine stopped when the client left


@pytest.mark.parametrize("status,answered,charged", [(500, 503, 100), (400, 400, 0)])
def test_an_engine_failure_is_charged_the_prompt_and_a_refusal_nothing_with_fake_engine(
        make_engine, make_gateway, status, answered, charged):
    gw = make_gateway([make_engine().url])
    gw.gw.limiter.clock = lambda: FROZEN
    _, key = gw.new_tenant(tokens_per_minute=10_000)
    with gw.client(key) as c:
        r = c.post("/v1/completions", json={"model": BASE, "prompt": "x" * 400, "fake_status": status})
    assert r.status_code == answered  # an engine's 5xx reaches the client as 503 engine_unavailable
    assert balance(gw, key) == 10_000 - charged  # 400 characters: 100 tokens estimated


def test_limits_are_checked_before_the_body_is_read_with_fake_engine(make_engine, make_gateway):
    engine = make_engine()
    gw = make_gateway([engine.url])
    _, key = gw.new_tenant(max_concurrency=1)
    slow = threading.Thread(target=lambda: gw.client(key).post("/v1/completions", json={
        "model": BASE, "prompt": "x", "max_tokens": 1, "fake_sleep_s": 3.0}))
    slow.start()
    while not engine.state.requests:
        time.sleep(0.01)
    started = time.monotonic()
    assert head_only(gw.url, "/v1/completions", key, 60_000) == 429  # answered without waiting for a body
    assert time.monotonic() - started < 2.5
    slow.join()
    _, broke = gw.new_tenant(tokens_per_minute=10)
    gw.gw.limiter.charge(tenant_id(gw, broke), 100, tokens_per_minute=10)
    assert head_only(gw.url, "/v1/chat/completions", broke, 60_000) == 429
    wait_released(gw, key)
    wait_released(gw, broke)


# --- slots are given back on every exit path -----------------------------------------------------------------------
def _truncated_body(gw, key: str) -> None:
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":".encode())
        time.sleep(0.2)


def _client_gives_up(gw, key: str) -> None:
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=gw.url, timeout=0.3,
                                                         headers={"authorization": f"Bearer {key}"}) as c:
        c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1, "fake_sleep_s": 1.0})


EXITS = {
    "engine error": (lambda gw, c: c.post("/v1/completions", json={"model": BASE, "prompt": "x",
                                                                   "fake_status": 500}), 503),
    "engine timeout": (lambda gw, c: c.post("/v1/completions", json={"model": BASE, "prompt": "x",
                                                                     "fake_sleep_s": 3}), 504),
    "no engine": (None, 503),
    "refused body": (lambda gw, c: c.post("/v1/completions", json={"model": BASE, "prompt": 1}), 400),
    "body too large": (lambda gw, c: c.post("/v1/completions", content=b"x" * 70_000), 413),
    "unknown model": (lambda gw, c: c.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404),
    "truncated body": (None, None),
    "client gone": (None, None),
}


@pytest.mark.parametrize("case", list(EXITS))
def test_a_non_streamed_requests_slot_is_released_on_every_exit_path_with_fake_engine(make_engine, make_gateway,
                                                                                       case):
    engine = make_engine()
    urls = [free_port_url()] if case == "no engine" else [engine.url]
    gw = make_gateway(urls, engine_read_timeout_s=1.0, health_check_interval_s=0)
    _, key = gw.new_tenant(max_concurrency=1)
    call, status = EXITS[case]
    with gw.client(key) as c:
        if case == "no engine":
            assert_openai_error(c.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 503)
        elif case == "truncated body":
            _truncated_body(gw, key)
        elif case == "client gone":
            _client_gives_up(gw, key)
        else:
            assert call(gw, c).status_code == status
    wait_released(gw, key)
    if case != "no engine":  # the one slot is free again
        with gw.client(key) as c:
            assert c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1}).status_code == 200
