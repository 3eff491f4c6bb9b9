"""Bad days, with the fake engine test double: engines down and back, damaged adapter files, deletion under
load, overload and fairness (docs/RELIABILITY.md; the same faults against the real engine: tests/reliability)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import BASE_ID, start_fake_engine
from tests.server.fake_engine import FakeEngineState, create_fake_engine
from tests.server.helpers import ServerThread, assert_openai_error, free_port_url, queued_tenants


def metric(url: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def stream(client: httpx.Client, body: dict) -> tuple[int, list[dict], bool, dict | None]:
    """(status, content events, saw [DONE], error object) of a streamed completion."""
    events, done, error = [], False, None
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return r.status_code, [], False, json.loads(r.read())["error"]
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                error = obj["error"]
            else:
                events.append(obj)
    return 200, events, done, error


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --- engine down, back on the same port ----------------------------------------------------------------------

def test_engine_down_is_a_fast_503_with_retry_after_then_traffic_resumes(make_gateway):
    engine = start_fake_engine()
    port = engine.server.port
    gw = make_gateway([engine.url], health_check_interval_s=0.2, health_check_failures=2, health_timeout_s=0.3)
    _, key = gw.new_tenant()
    body = {"model": BASE_ID, "prompt": "x", "max_tokens": 2}
    with gw.client(key) as c:
        assert c.post("/v1/completions", json=body).status_code == 200
        engine.server.stop()
        wait_until(lambda: httpx.get(gw.url + "/ready").status_code == 503, 3, "/ready to turn false")
        wait_until(lambda: gw.gw.upstream.router.is_ejected(engine.url), 3, "the engine's ejection")
        # A port that accepts connections but serves nothing (an engine starting up): still answered at once.
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        try:
            for _ in range(5):
                t0 = time.monotonic()
                r = c.post("/v1/completions", json=body)
                assert time.monotonic() - t0 < 1.0
                err = assert_openai_error(r, 503)
                assert err["code"] == "engine_unavailable" and int(r.headers["retry-after"]) >= 1
            assert gw.gw.upstream.router.is_ejected(engine.url)  # probes of the silent port time out
        finally:
            listener.close()
        state = FakeEngineState(base_model=BASE_ID)
        back = ServerThread(create_fake_engine(state), port=port).start()
        try:
            wait_until(lambda: c.post("/v1/completions", json=body).status_code == 200, 5, "traffic to resume")
            assert httpx.get(gw.url + "/ready").status_code == 200
        finally:
            back.stop()


# --- adapter files damaged or removed behind the service's back ------------------------------------------------

def test_damaged_or_removed_adapter_files_make_only_that_adapter_unavailable(make_engine, make_gateway, tmp_path):
    engine = make_engine()
    gw = make_gateway([engine.url], adapter_check_interval_s=0)
    engine.state.store = gw.settings.store_dir
    _, key = gw.new_tenant()
    for i, name in enumerate(("good", "bad", "gone")):
        assert gw.upload(key, name, tmp_path / name, seed=i).status_code == 201
    ids = {a.name: a.internal_id for a in gw.gw.registry.list_adapters(None)}
    weights = gw.settings.store_dir / ids["bad"] / "adapter_model.safetensors"
    original = weights.read_bytes()
    damaged = bytearray(original)
    damaged[-5] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(damaged))
    for f in (gw.settings.store_dir / ids["gone"]).iterdir():
        f.unlink()
    sent_before = len(engine.state.requests)
    with gw.client(key) as c:
        for name, reason in (("bad", "SHA-256"), ("gone", "missing")):
            for _ in range(2):  # stable: the same answer every time
                err = assert_openai_error(c.post("/v1/completions", json={"model": name, "prompt": "x"}), 503)
                assert err["code"] == "adapter_unavailable" and err["param"] == "model"
                assert reason in err["message"] and ids[name] not in err["message"]
            info = c.get(f"/v1/adapters/{name}").json()
            assert info["status"] == "unavailable" and reason in info["status_details"]
        assert c.post("/v1/completions", json={"model": "good", "prompt": "x"}).status_code == 200
        assert c.get("/v1/adapters/good").json()["status"] == "ready"
        assert len(engine.state.requests) == sent_before + 1  # the broken ones never reached the engine
        assert metric(gw.url, "flylora_gateway_adapters_unavailable") == 2
        assert metric(gw.url, "flylora_gateway_adapter_integrity_failures_total", reason="checksum_mismatch") == 1
        assert metric(gw.url, "flylora_gateway_adapter_integrity_failures_total", reason="missing") == 1
        wait_until(lambda: {ids["bad"], ids["gone"]} <= set(engine.state.unloads), 5, "the engines to unload them")
        weights.write_bytes(original)  # restored: serves again, by itself
        assert c.post("/v1/completions", json={"model": "bad", "prompt": "x"}).status_code == 200
        assert c.get("/v1/adapters/bad").json()["status"] == "ready"
        assert metric(gw.url, "flylora_gateway_adapters_unavailable") == 1
        assert c.delete("/v1/adapters/gone").status_code == 204  # a broken adapter can be deleted
        assert metric(gw.url, "flylora_gateway_adapters_unavailable") == 0


# --- deletion while requests run ------------------------------------------------------------------------------

def test_delete_lets_running_requests_finish_then_cuts_them_cleanly(make_engine, make_gateway, tmp_path):
    engine = make_engine()
    gw = make_gateway([engine.url], delete_grace_s=1.0)
    engine.state.store = gw.settings.store_dir
    _, key = gw.new_tenant()
    assert gw.upload(key, "doomed", tmp_path / "a").status_code == 201
    internal = gw.gw.registry.list_adapters(None)[0].internal_id
    results: dict[str, object] = {}
    with gw.client(key) as c, ThreadPoolExecutor(4) as pool:
        short = pool.submit(stream, c, {"model": "doomed", "prompt": "x", "max_tokens": 5,
                                        "fake_chunk_delay_s": 0.05})
        long_stream = pool.submit(stream, c, {"model": "doomed", "prompt": "x", "max_tokens": 200,
                                              "fake_chunk_delay_s": 0.05})
        waiting = pool.submit(c.post, "/v1/completions", json={"model": "doomed", "prompt": "x",
                                                                "fake_sleep_s": 30})
        wait_until(lambda: engine.state.in_flight == 3, 5, "three requests at the engine")
        t0 = time.monotonic()
        results["delete"] = c.delete("/v1/adapters/doomed").status_code
        results["delete_s"] = time.monotonic() - t0
        status, events, done, error = short.result(10)
        assert status == 200 and done and error is None and len(events) == 5  # finished within the grace
        status, events, done, error = long_stream.result(10)
        assert status == 200 and events and not done and error["code"] == "model_not_found"
        assert "deleted while this request was running" in error["message"]
        err = assert_openai_error(waiting.result(10), 404)
        assert err["code"] == "model_not_found"
        err = assert_openai_error(c.post("/v1/completions", json={"model": "doomed", "prompt": "x"}), 404)
    assert results["delete"] == 204 and 1.0 <= results["delete_s"] < 5.0, results
    # The cut stream's connection was closed: the engine saw it go (vLLM aborts such a request).
    wait_until(lambda: len(engine.state.aborted) == 1, 5, "the engine to see the cut stream go")
    assert engine.state.unloads == [internal]
    assert not gw.gw.upstream.router.is_down(engine.url)  # a cut is not an engine failure
    assert gw.gw.limiter.in_flight == {} and gw.gw.admission.in_flight == 0


def test_a_request_admitted_during_a_delete_gets_404_never_the_engine(make_engine, make_gateway, tmp_path):
    engine = make_engine()
    gw = make_gateway([engine.url], delete_grace_s=2.0)
    engine.state.store = gw.settings.store_dir
    _, key = gw.new_tenant()
    assert gw.upload(key, "doomed", tmp_path / "a").status_code == 201
    with gw.client(key) as c, ThreadPoolExecutor(2) as pool:
        running = pool.submit(c.post, "/v1/completions", json={"model": "doomed", "prompt": "x", "fake_sleep_s": 1})
        wait_until(lambda: engine.state.in_flight == 1, 5, "a request at the engine")
        deleting = pool.submit(c.delete, "/v1/adapters/doomed")
        wait_until(lambda: gw.gw.flights.is_closed(gw.gw.registry.list_adapters(None, state=None)[0].internal_id),
                   5, "the drain to start")
        sent = len(engine.state.requests)
        assert_openai_error(c.post("/v1/completions", json={"model": "doomed", "prompt": "x"}), 404)
        assert len(engine.state.requests) == sent
        assert running.result(10).status_code == 200  # it finished within the grace
        assert deleting.result(10).status_code == 204


# --- overload and fairness -----------------------------------------------------------------------------------

def test_overload_gets_429_or_waits_never_more_than_the_cap_at_the_engine(make_engine, make_gateway):
    engine = make_engine()
    gw = make_gateway([engine.url], admission_in_flight_per_engine=4, admission_tenant_share=1.0,
                      admission_queue_depth=8, max_concurrency_per_tenant=1000)
    _, key = gw.new_tenant()
    body = {"model": BASE_ID, "prompt": "x", "max_tokens": 2, "fake_sleep_s": 0.2}
    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"}, timeout=60,
                      limits=httpx.Limits(max_connections=200)) as c, ThreadPoolExecutor(100) as pool:
        responses = list(pool.map(lambda _: c.post("/v1/completions", json=body), range(100)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 12  # the 4 running + the 8 queued, at least
    for r in responses:
        if r.status_code == 429:
            assert assert_openai_error(r, 429)["code"] == "queue_full" and r.headers["retry-after"] == "1"
    assert engine.state.max_in_flight <= 4
    assert gw.gw.admission.in_flight == 0 and gw.gw.admission.waiting() == 0


def test_a_quiet_tenant_does_not_wait_behind_a_noisy_tenants_backlog(make_engine, make_gateway):
    engine = make_engine()
    gw = make_gateway([engine.url], admission_in_flight_per_engine=4, admission_queue_depth=200,
                      max_concurrency_per_tenant=1000)
    _, noisy = gw.new_tenant()
    quiet_name, quiet = gw.new_tenant()
    quiet_id = gw.gw.registry.get_tenant(quiet_name).id
    slow = {"model": BASE_ID, "prompt": "x", "max_tokens": 2, "fake_sleep_s": 0.5}
    stop = threading.Event()

    def flood(client: httpx.Client) -> None:
        while not stop.is_set():
            client.post("/v1/completions", json=slow)

    with queued_tenants(gw.gw.admission) as queued, \
            httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {noisy}"}, timeout=120,
                         limits=httpx.Limits(max_connections=100)) as nc, ThreadPoolExecutor(40) as pool:
        for _ in range(40):  # 40 in flight against 4 slots: a backlog of 36+ (10x what the engine takes)
            pool.submit(flood, nc)
        wait_until(lambda: gw.gw.admission.waiting() >= 30, 10, "the noisy backlog")
        latencies = []
        with gw.client(quiet) as qc:
            for _ in range(5):
                t0 = time.monotonic()
                assert qc.post("/v1/completions", json={**slow, "fake_sleep_s": 0.05}).status_code == 200
                latencies.append(time.monotonic() - t0)
        stop.set()
    # Without fair admission each would wait for the 36 queued ahead (4.5 s at 4 x 0.5 s); here every one found
    # a slot at once (only the noisy tenant's requests ever waited), so the typical one takes what the engine
    # takes. (Not the slowest: 40 flooding threads share this process and 2 cores, and one of five once took
    # 0.9 s in CI without having waited for a slot.)
    assert queued and quiet_id not in queued, latencies
    assert sorted(latencies)[2] < 0.5, latencies
    assert engine.state.max_in_flight <= 4


def test_settings_files_env_names_exist_for_every_reliability_setting():
    from server.settings import Settings

    names = {"admission_in_flight_per_engine", "admission_tenant_share", "admission_queue_depth",
             "admission_queue_timeout_s", "adapter_check_interval_s", "delete_grace_s", "shutdown_grace_s"}
    assert names <= set(Settings.model_fields)
    s = Settings(_env_file=None, engine_urls=["http://a:1", "http://b:2"])
    assert s.admission_in_flight_per_engine == 64 and s.shutdown_grace_s == 30


def test_a_client_that_hangs_up_while_queued_gives_its_place_back(make_engine, make_gateway):
    engine = make_engine()
    gw = make_gateway([engine.url], admission_in_flight_per_engine=1, admission_tenant_share=1.0)
    _, key = gw.new_tenant()
    body = {"model": BASE_ID, "prompt": "x", "max_tokens": 2}
    with gw.client(key) as c, ThreadPoolExecutor(2) as pool:
        holder = pool.submit(c.post, "/v1/completions", json={**body, "fake_sleep_s": 2})
        wait_until(lambda: engine.state.in_flight == 1, 5, "the first request at the engine")
        impatient = pool.submit(httpx.post, gw.url + "/v1/completions", json=body, timeout=0.5,
                                headers={"authorization": f"Bearer {key}"})
        wait_until(lambda: gw.gw.admission.waiting() == 1, 5, "the second request to queue")
        try:
            impatient.result(5)
        except httpx.TimeoutException:
            pass
        wait_until(lambda: gw.gw.admission.waiting() == 0, 2, "the hung-up request to leave the queue")
        assert holder.result(10).status_code == 200
    assert len(engine.state.requests) == 1  # the one that hung up never reached the engine
    assert gw.gw.admission.in_flight == 0 and gw.gw.limiter.in_flight == {}


def test_an_engine_5xx_is_retried_on_another_replica_else_a_clean_503(make_engine, make_gateway):
    sick, well = make_engine(), make_engine()
    sick.state.force_status = 500  # e.g. draining after SIGTERM: vLLM fails new requests
    gw = make_gateway([sick.url, well.url])
    _, key = gw.new_tenant()
    with gw.client(key) as c:
        for _ in range(4):  # base requests go to the least loaded replica: the sick one gets some
            assert c.post("/v1/completions", json={"model": BASE_ID, "prompt": "x", "max_tokens": 2}).status_code == 200
    assert sick.state.requests, "the sick replica was never tried"
    assert not gw.gw.upstream.router.is_down(sick.url)  # an answer is not a connection failure
    lone = make_gateway([sick.url])
    _, key = lone.new_tenant()
    with lone.client(key) as c:
        r = c.post("/v1/completions", json={"model": BASE_ID, "prompt": "x"})
    err = assert_openai_error(r, 503)
    assert err["code"] == "engine_unavailable" and "EngineCore" not in err["message"] and r.headers["retry-after"]


def test_ready_taking_an_engine_back_means_requests_go_to_it_at_once(make_gateway):
    """A gateway started before its engine (ejected at the first check): as soon as /ready says 200, requests
    are served, not answered 503 until the next periodic check."""
    url = free_port_url()
    gw = make_gateway([url], health_check_interval_s=60, health_check_failures=1)
    wait_until(lambda: gw.gw.upstream.router.is_ejected(url), 5, "the first check to eject the engine")
    _, key = gw.new_tenant()
    body = {"model": BASE_ID, "prompt": "x", "max_tokens": 2}
    with gw.client(key) as c:
        assert_openai_error(c.post("/v1/completions", json=body), 503)
        engine = ServerThread(create_fake_engine(FakeEngineState(base_model=BASE_ID)),
                              port=int(url.rsplit(":", 1)[1])).start()
        try:
            assert httpx.get(gw.url + "/ready").status_code == 200
            assert c.post("/v1/completions", json=body).status_code == 200
        finally:
            engine.stop()
