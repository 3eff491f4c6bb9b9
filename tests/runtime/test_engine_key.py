"""The engine key (flylora_runtime/engine/auth.py, installed by flylora-engine): a client without it cannot load
adapters, run inference or reach any other route of the engine, through any of vLLM's route families; only
/health and /metrics stay open. The launcher passes the key by environment, never argv, and refuses to listen
beyond loopback without one. (The same attacks against a live vLLM engine: tests/server/test_cli_real_engine.py.)"""

from __future__ import annotations

import importlib

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from flylora_runtime.engine.auth import API_KEY_ENV, MIDDLEWARE, OPEN_PATHS, EngineKeyMiddleware
from flylora_runtime.engine.launcher import EngineConfig, build_parser, command

KEY = "engine-key-for-tests-0123456789abcdef"
#: Routes of vLLM's server outside the /v1 prefix its own --api-key guards, and inside it.
ATTACKS = [("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}),
           ("POST", "/adapters", {"name": "x", "src": "/etc"}),  # SageMaker's adapter loading
           ("POST", "/invocations", {"model": "x", "prompt": "hi"}),  # SageMaker's inference
           ("POST", "/v1/completions", {"model": "x", "prompt": "hi"}),
           ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
           ("POST", "/tokenize", {"prompt": "hi"}), ("GET", "/v1/models", None), ("POST", "/pause", None),
           ("POST", "/health", None), ("GET", "/metricsx", None), ("GET", "/health/../v1/models", None)]


@pytest.fixture
def engine_app(monkeypatch) -> TestClient:
    """A stand-in for vLLM's app with the middleware installed the way vLLM installs ``--middleware``
    (import path -> class -> ``app.add_middleware(cls)``, the key read from the environment)."""
    monkeypatch.setenv(API_KEY_ENV, KEY)
    app = FastAPI()
    reached: list[str] = []

    @app.api_route("/{path:path}", methods=["GET", "POST", "HEAD"])
    async def anything(path: str, request: Request) -> dict:
        reached.append(request.url.path)
        return {"ok": True}

    module, name = MIDDLEWARE.rsplit(".", 1)
    app.add_middleware(getattr(importlib.import_module(module), name))
    client = TestClient(app)
    client.reached = reached  # type: ignore[attr-defined]
    return client


@pytest.mark.parametrize("method,path,body", ATTACKS)
def test_routes_refuse_requests_without_the_engine_key(engine_app, method, path, body):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"},
                    {"authorization": f"Bearer {KEY}x"}):
        r = engine_app.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (path, headers, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.headers["www-authenticate"] == "Bearer"
    assert engine_app.reached == []
    r = engine_app.request(method, path, json=body, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and len(engine_app.reached) == 1


@pytest.mark.parametrize("path", sorted(OPEN_PATHS))
def test_health_and_metrics_stay_open_for_probes_and_prometheus(engine_app, path):
    assert engine_app.get(path).status_code == 200
    assert engine_app.head(path).status_code == 200


def test_the_middleware_refuses_to_start_without_a_key(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=API_KEY_ENV):
        EngineKeyMiddleware(lambda *a: None)


def test_launcher_passes_the_key_by_environment_and_installs_the_middleware(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv(API_KEY_ENV, KEY)
    config = EngineConfig(**vars(build_parser().parse_args(["--model", str(tmp_path), "--host", "0.0.0.0",
                                                                "--max-loras", "4", "--max-cpu-loras", "8"])))
    assert config.api_key == KEY and KEY not in repr(config)
    argv, env = command(config)
    assert argv[argv.index("--middleware") + 1] == MIDDLEWARE
    assert KEY not in " ".join(argv) and env[API_KEY_ENV] == KEY
    assert "--api-key" not in build_parser().format_help() and KEY not in build_parser().format_help()


def test_launcher_without_a_key_installs_nothing_and_drops_a_stale_one(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv(API_KEY_ENV, KEY)
    argv, env = command(EngineConfig(model=str(tmp_path), host="127.0.0.1", api_key=None, max_loras=4,
                                         max_cpu_loras=8))
    assert "--middleware" not in argv and API_KEY_ENV not in env


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::", "engine"])
def test_launcher_refuses_a_non_loopback_address_without_a_key(tmp_path, host):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"not a loopback address: set {API_KEY_ENV}"):
        EngineConfig(model=str(tmp_path), host=host, api_key=None).validate()
    EngineConfig(model=str(tmp_path), host=host, api_key=KEY).validate()
    for loopback in ("127.0.0.1", "::1", "localhost"):
        EngineConfig(model=str(tmp_path), host=loopback, api_key=None).validate()


@pytest.mark.parametrize("bad,why", [("CHANGE-ME", "placeholder"), ("short-key", "fewer than the 32"),
                                     ("a" * 40, "distinct"), ("x" * 20 + " 0123456789abcdef", "whitespace")])
def test_launcher_refuses_weak_keys(tmp_path, bad, why):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=why):
        EngineConfig(model=str(tmp_path), api_key=bad).validate()
