"""The quality API over real HTTP and a real SQLite registry, against the fake engine test double (which
serves per-request energies on /flylora/energy as the plugin does, set by each request's `fake_energy`)."""

from __future__ import annotations

import time

import httpx
import pytest

from server.quality import ks_statistic, mde
from tests.server.conftest import BASE_ID
from tests.server.helpers import assert_openai_error

WINDOW = 4
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def stack(make_engine, make_gateway, tmp_path):
    engine = make_engine()
    gw = make_gateway([engine.url], quality_window=WINDOW, quality_flush_interval_s=0.05, quality_refresh_s=0.1)
    engine.state.store = gw.settings.store_dir
    return engine, gw


def _quality(c: httpx.Client, name: str) -> httpx.Response:
    return c.get(f"/v1/adapters/{name}/quality")


def _wait_observed(c: httpx.Client, name: str, count: int) -> dict:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        got = _quality(c, name).json()
        if got["window"]["observed"] >= count:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{name}: {count} requests never reached the window: {got}")


def _send(c: httpx.Client, model: str, energy: float, *, stream: bool = False, endpoint: str = "chat") -> None:
    body = {"model": model, "max_tokens": 3, "fake_energy": energy, "stream": stream}
    if endpoint == "chat":
        r = c.post("/v1/chat/completions", json={**body, "messages": MESSAGES})
    else:
        r = c.post("/v1/completions", json={**body, "prompt": "x"})
    assert r.status_code == 200, r.text


def test_window_mde_reference_drift_and_metrics(stack, tmp_path):
    engine, gw = stack
    _, key = gw.new_tenant()
    assert gw.upload(key, "support", tmp_path / "a").status_code == 201
    with gw.client(key) as c:
        empty = _quality(c, "support").json()
        assert empty["object"] == "adapter.quality" and empty["id"] == "support"
        assert empty["window"] == {"size": WINDOW, "fill": 0, "observed": 0}
        assert empty["mean_energy"] is None and empty["mde"] is None and empty["drift"] is None
        first = [-10.0, -12.0, -11.0, -13.0]
        for i, e in enumerate(first):  # streamed and not, both endpoints: all recorded alike
            _send(c, "support", e, stream=i % 2 == 1, endpoint="chat" if i < 2 else "completions")
        got = _wait_observed(c, "support", 4)
        assert got["mean_energy"] == pytest.approx(-11.5) and got["mde"] == pytest.approx(mde(first))
        assert got["mean_max_prob"] == 0.5 and got["mean_entropy"] == 1.5 and got["mean_tokens"] == 3
        assert got["reference"]["source"] == "first" and got["drift"]["ks"] == 0.0
        later = [-20.0, -21.0, -22.0, -23.0]
        for e in later:
            _send(c, "support", e)
        got = _wait_observed(c, "support", 8)
        assert got["mean_energy"] == pytest.approx(-21.5)
        assert got["drift"]["ks"] == pytest.approx(ks_statistic(later, first)) == 1.0
        assert got["drift"]["p_value"] < 0.05 and got["drift"]["energy_shift"] < -5
    # the engine was asked by the gateway's own ids (a tenant may not send request_id: the request policy refuses
    # it) with the tokens received
    asked = [q for body in engine.state.energy_queries for q in body["requests"]]
    assert len(asked) == 8 and all(q["tokens"] == 3 for q in asked)
    sent = [b.get("request_id") for b in engine.state.bodies()]
    assert len(set(sent)) == len(sent) and None not in sent
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(gw.url + "/metrics").text
        if "flylora_adapter_quality_drift{" in metrics and 'adapter="support"} 1.0' in metrics:
            break
        time.sleep(0.1)
    drift = [line for line in metrics.splitlines() if line.startswith("flylora_adapter_quality_drift{")]
    assert len(drift) == 1 and 'adapter="support"' in drift[0] and drift[0].endswith(" 1.0")
    assert 'flylora_adapter_quality_window_fill{adapter="support"' in metrics
    assert 'flylora_gateway_quality_samples_total{result="recorded"} 8.0' in metrics


def test_pin_reference_and_calibrate(stack, tmp_path):
    _, gw = stack
    _, key = gw.new_tenant()
    assert gw.upload(key, "support", tmp_path / "a").status_code == 201
    with gw.client(key) as c:
        err = assert_openai_error(c.post("/v1/adapters/support/quality/reference"), 409)
        assert err["code"] == "quality_window_not_full" and "0 of 4" in err["message"]
        for e in (-1.0, -2.0, -3.0, -4.0, -8.0, -8.0, -8.0, -8.0):
            _send(c, "support", e)
        got = _wait_observed(c, "support", 8)
        assert got["drift"]["ks"] == 1.0
        pinned = c.post("/v1/adapters/support/quality/reference").json()
        assert pinned["reference"]["source"] == "pinned" and pinned["drift"]["ks"] == 0.0
        assert pinned["estimated_accuracy"] is None
        points = [{"mde": -1.40, "accuracy": 0.9}, {"mde": -1.45, "accuracy": 0.7}, {"mde": -1.5, "accuracy": 0.5}]
        cal = c.post("/v1/adapters/support/quality/calibrate", json={"points": points}).json()
        assert cal["calibration"]["slope"] == pytest.approx(4.0) and cal["calibration"]["r2"] == pytest.approx(1.0)
        assert cal["calibration"]["window_size"] == WINDOW and cal["calibration"]["points"] == 3
        assert cal["estimated_accuracy"] == pytest.approx(min(1, max(0, 4.0 * (cal["mde"] + 1.40) + 0.9)))
        # sets of N per-request energies are reduced to their MDE
        sets = [{"energies": [-1, -2, -3, -4], "accuracy": 0.2}, {"energies": [-1, -1, -1, -1.5], "accuracy": 0.8}]
        fit = c.post("/v1/adapters/support/quality/calibrate", json={"sets": sets}).json()["calibration"]
        assert fit["points"] == 2 and fit["r2"] == pytest.approx(1.0)


@pytest.mark.parametrize("body, needle", [
    ({}, "either"), ({"points": [], "sets": []}, "either"), ({"points": [{"mde": -1, "accuracy": 0.5}]}, "2 to"),
    ({"points": [{"mde": -1, "accuracy": 1.5}, {"mde": -2, "accuracy": 0.5}]}, "between"),
    ({"points": [{"mde": "x", "accuracy": 0.5}, {"mde": -2, "accuracy": 0.5}]}, "finite number"),
    ({"points": [{"mde": -1, "accuracy": 0.5}, {"mde": -1, "accuracy": 0.7}]}, "all equal"),
    ({"sets": [{"energies": [-1, -2], "accuracy": 0.5}, {"energies": [-1, -2], "accuracy": 0.6}]}, "exactly 4"),
    ({"points": [1, 2]}, "object"), ([1], "either"),
])
def test_malformed_calibrations_are_400_in_openais_shape(stack, tmp_path, body, needle):
    _, gw = stack
    _, key = gw.new_tenant()
    assert gw.upload(key, "support", tmp_path / "a").status_code == 201
    with gw.client(key) as c:
        err = assert_openai_error(c.post("/v1/adapters/support/quality/calibrate", json=body), 400)
        assert needle in err["message"]
        assert_openai_error(c.post("/v1/adapters/support/quality/calibrate", content=b"{not json"), 400)


def test_another_tenants_adapter_is_a_404_like_a_missing_one_and_base_windows_are_per_tenant(stack, tmp_path):
    _, gw = stack
    _, owner = gw.new_tenant()
    _, other = gw.new_tenant()
    assert gw.upload(owner, "secret", tmp_path / "a").status_code == 201
    with gw.client(other) as c:
        for method, path in (("GET", "quality"), ("POST", "quality/reference"), ("POST", "quality/calibrate")):
            theirs = c.request(method, f"/v1/adapters/secret/{path}", json={"points": []})
            missing = c.request(method, f"/v1/adapters/nothing/{path}", json={"points": []})
            assert theirs.status_code == missing.status_code == 404
            assert theirs.json()["error"]["message"].replace("secret", "X") == \
                missing.json()["error"]["message"].replace("nothing", "X")
    with gw.client(owner) as c:
        _send(c, BASE_ID, -30.0)
        assert _wait_observed(c, BASE_ID, 1)["mean_energy"] == -30.0
    with gw.client(other) as c:
        assert _quality(c, BASE_ID).json()["window"]["observed"] == 0
    assert_openai_error(httpx.get(gw.url + "/v1/adapters/secret/quality"), 401)


def test_an_engine_without_energies_costs_nothing_but_a_count(make_engine, make_gateway, tmp_path):
    engine = make_engine()
    engine.state.energy_supported = False
    gw = make_gateway([engine.url], quality_window=WINDOW, quality_flush_interval_s=0.05)
    _, key = gw.new_tenant()
    with gw.client(key) as c:
        for _ in range(3):
            _send(c, BASE_ID, -1.0)
        deadline = time.monotonic() + 10
        while 'quality_samples_total{result="unsupported"} 3.0' not in httpx.get(gw.url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _quality(c, BASE_ID).json()["window"]["observed"] == 0
    assert len(engine.state.energy_queries) == 1  # asked once, then left alone for a minute


def test_quality_can_be_turned_off(make_engine, make_gateway):
    engine = make_engine()
    gw = make_gateway([engine.url], quality_enabled=False)
    _, key = gw.new_tenant()
    with gw.client(key) as c:
        _send(c, BASE_ID, -1.0)
        assert "request_id" not in engine.state.bodies()[-1]  # no ids are set when quality is off
        assert assert_openai_error(_quality(c, BASE_ID), 503)["code"] == "quality_monitoring_disabled"
    assert "flylora_adapter_quality" not in httpx.get(gw.url + "/metrics").text


def test_a_deleted_adapters_window_goes_with_it(stack, tmp_path):
    _, gw = stack
    _, key = gw.new_tenant()
    assert gw.upload(key, "brief", tmp_path / "a").status_code == 201
    with gw.client(key) as c:
        for e in (-1.0, -2.0, -3.0, -4.0):
            _send(c, "brief", e)
        assert _wait_observed(c, "brief", 4)["window"]["fill"] == 4
        gauge = 'flylora_adapter_quality_window_fill{adapter="brief"'
        deadline = time.monotonic() + 10
        while gauge not in httpx.get(gw.url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.delete("/v1/adapters/brief").status_code == 204
        assert_openai_error(_quality(c, "brief"), 404)
        while gauge in httpx.get(gw.url + "/metrics").text:  # its gauges and rows are dropped
            assert time.monotonic() < deadline + 10
            time.sleep(0.05)
        assert gw.upload(key, "brief", tmp_path / "b").status_code == 201  # a new adapter, a new window
        assert _quality(c, "brief").json()["window"] == {"size": WINDOW, "fill": 0, "observed": 0}
    assert gw.gw.quality.store.subjects() == []


@pytest.mark.parametrize("failures, recorded, errors", [(1, 2, 0), (5, 0, 2)])
def test_a_failed_engine_call_is_retried_once(make_engine, make_gateway, failures, recorded, errors):
    engine = make_engine()
    engine.state.energy_failures = failures
    gw = make_gateway([engine.url], quality_window=WINDOW, quality_flush_interval_s=0.05)
    _, key = gw.new_tenant()
    with gw.client(key) as c:
        _send(c, BASE_ID, -1.0)
        _send(c, BASE_ID, -2.0)
        deadline = time.monotonic() + 10
        while len(engine.state.energy_queries) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        assert _quality(c, BASE_ID).json()["window"]["observed"] == recorded
    metrics = httpx.get(gw.url + "/metrics").text
    assert f'flylora_gateway_quality_samples_total{{result="error"}} {errors}.0' in metrics


def test_a_stream_the_sdk_closes_at_done_is_complete_and_measured(stack, tmp_path):
    """The openai SDK closes the connection as soon as it reads [DONE]; vLLM may end its body a moment later.
    The client has the whole answer: the request counts as 200 and its energy goes into the window."""
    engine, gw = stack
    _, key = gw.new_tenant()
    client = gw.openai(key)
    chunks = list(client.chat.completions.create(model=BASE_ID, messages=MESSAGES, max_tokens=3, stream=True,
                                                 extra_body={"fake_tail_delay_s": 1.0, "fake_energy": -7.0}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).count(" w") == 3
    with gw.client(key) as c:
        assert _wait_observed(c, BASE_ID, 1)["mean_energy"] == -7.0
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'flylora_gateway_requests_total{endpoint="chat.completions",status="200"' in metrics
    assert 'status="499"' not in metrics
