"""Per-tenant limits over HTTP (429 + Retry-After) and the /metrics content."""

from __future__ import annotations

import threading

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.helpers import assert_openai_error

BASE = "SmolLM2-135M-Instruct"


def _samples(gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(gateway.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_concurrency_limit_is_429_with_retry_after_with_fake_engine(gateway, engine):
    _, key = gateway.new_tenant(max_concurrency=2)
    started = len(engine.state.requests)
    results: list[int] = []

    def slow() -> None:
        with gateway.client(key) as c:
            results.append(c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1,
                                                           "fake_sleep_s": 1.5}).status_code)

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    while len(engine.state.requests) < started + 2:  # both are at the engine
        threading.Event().wait(0.01)
    with gateway.client(key) as c:
        r = c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1})
    err = assert_openai_error(r, 429)
    assert err["code"] == "concurrency_limit_exceeded" and r.headers["retry-after"] == "1"
    for t in threads:
        t.join()
    assert results == [200, 200]
    with gateway.client(key) as c:  # slots were given back
        assert c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1}).status_code == 200


def test_default_concurrency_is_a_fair_share_of_the_engine_batch_with_fake_engine(gateway, engine):
    """A tenant without an override gets 16 requests in flight (a quarter of an engine's default batch of 64),
    not the whole batch: the 17th is refused while the 16 run, and another tenant is still served."""
    assert gateway.settings.max_concurrency_per_tenant == 16
    _, key = gateway.new_tenant()
    started = len(engine.state.requests)
    statuses: list[int] = []

    def one() -> None:
        with gateway.client(key) as c:
            statuses.append(c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1,
                                                            "fake_sleep_s": 3.0}).status_code)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    while len(engine.state.requests) < started + 16:
        threading.Event().wait(0.01)
    with gateway.client(key) as c:
        err = assert_openai_error(c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1}),
                                  429)
    assert err["code"] == "concurrency_limit_exceeded"
    _, other = gateway.new_tenant()
    with gateway.client(other) as c:
        assert c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1}).status_code == 200
    for t in threads:
        t.join()
    assert statuses == [200] * 16


def test_tokens_per_minute_is_429_with_retry_after_with_fake_engine(gateway, engine):
    _, key = gateway.new_tenant(tokens_per_minute=60)
    client = gateway.openai(key)
    first = client.completions.create(model=BASE, prompt="x", max_tokens=80)  # overdraws the 60-token bucket
    assert first.usage.total_tokens > 60
    before = len(engine.state.requests)
    with gateway.client(key) as c:
        r = c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1})
    err = assert_openai_error(r, 429)
    assert err["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 20  # ~21 tokens in deficit at 1 token/s
    assert len(engine.state.requests) == before


def test_streamed_usage_counts_against_tokens_per_minute_with_fake_engine(gateway):
    _, key = gateway.new_tenant(tokens_per_minute=30)
    with gateway.client(key) as c:
        r = c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 40, "stream": True})
        assert r.status_code == 200 and "usage" not in r.text
        assert_openai_error(c.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 429)


def test_metrics_cover_requests_tokens_latency_ttft_uploads_and_never_keys(gateway, tmp_path):
    name, key = gateway.new_tenant()
    assert gateway.upload(key, "m1", tmp_path / "a").status_code == 201
    client = gateway.openai(key)
    client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "secret prompt"}], max_tokens=3)
    list(client.completions.create(model="m1", prompt="p", max_tokens=2, stream=True))
    with gateway.client(key) as c:
        c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        c.post("/v1/adapters", data={"name": "bad"}, files={"config": ("c", b"{}"), "weights": ("w", b"\x00" * 9)})
        c.delete("/v1/adapters/m1")
    text = httpx.get(gateway.url + "/metrics").text
    s = _samples(gateway)

    def m(metric: str, **labels: str) -> float:
        return s[("flylora_gateway_" + metric, tuple(sorted(labels.items())))]

    assert m("requests_total", endpoint="chat.completions", status="200", tenant=name) == 1
    assert m("requests_total", endpoint="completions", status="200", tenant=name) == 1
    assert m("requests_total", endpoint="completions", status="404", tenant=name) == 1
    assert m("completion_tokens_total", adapter="m1", tenant=name) == 5
    assert m("prompt_tokens_total", adapter="m1", tenant=name) > 0
    assert m("request_duration_seconds_count", endpoint="chat.completions", stream="false") >= 1
    assert m("time_to_first_token_seconds_count", endpoint="completions") >= 1
    assert m("in_flight_requests", tenant=name) == 0
    assert m("adapter_uploads_total", tenant=name) == 1
    assert m("adapter_deletes_total", tenant=name) == 1
    assert m("adapter_validation_failures_total", reason="InvalidConfig", tenant=name) == 1
    assert key not in text and "secret prompt" not in text and "fl-" not in text


def test_adapter_labels_are_capped_into_other_with_fake_engine(make_engine, make_gateway, tmp_path):
    gw = make_gateway([make_engine().url], max_adapter_labels=1)
    name, key = gw.new_tenant()
    client = gw.openai(key)
    for adapter in ("first", "second", "third"):
        assert gw.upload(key, adapter, tmp_path / adapter).status_code == 201
        client.completions.create(model=adapter, prompt="x", max_tokens=1)
    client.completions.create(model=BASE, prompt="x", max_tokens=1)
    s = _samples(gw)
    labels = {dict(k[1])["adapter"]: v for k, v in s.items() if k[0] == "flylora_gateway_completion_tokens_total"}
    assert labels == {"first": 1, "other": 2, BASE: 1}
