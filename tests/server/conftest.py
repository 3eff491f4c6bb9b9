"""Gateway test fixtures: a real gateway (uvicorn, real HTTP, real SQLite in tmp) in front of the fake engine
test double (``fake_engine.py``, also real HTTP on loopback)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from flylora_runtime.client import GatewayClient
from server.app import create_app
from server.settings import Settings
from server.gateway import Gateway

from tests.server.fake_engine import FAKE_ENGINE_KNOBS, FakeEngineState, create_fake_engine
from tests.server.helpers import ADMIN_KEY, ServerThread, adapter_files, upload_form, write_base_model

BASE_ID = "SmolLM2-135M-Instruct"
_names = itertools.count()


@dataclass
class FakeEngine:
    state: FakeEngineState
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class GatewayHandle:
    settings: Settings
    server: ServerThread
    app: Any

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def gw(self) -> Gateway:
        return self.app.state.gateway

    def client(self, key: str | None) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def admin(self) -> httpx.Client:
        return self.client(ADMIN_KEY)

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def new_tenant(self, **limits: Any) -> tuple[str, str]:
        name = f"tenant-{next(_names)}"
        with GatewayClient(self.url, ADMIN_KEY) as admin:
            return name, admin.create_tenant(name, **limits)

    def upload(self, key: str, name: str, folder: Path, **adapter_kwargs: Any) -> httpx.Response:
        """The raw response (API tests look at refusals too; :class:`GatewayClient` raises on them)."""
        config, weights = adapter_files(folder, **adapter_kwargs)
        data, files = upload_form(name, config.read_bytes(), weights.read_bytes())
        with self.client(key) as c:
            return c.post("/v1/adapters", data=data, files=files)

    def store_entries(self) -> set[str]:
        return {p.name for p in self.settings.store_dir.iterdir()}


def start_fake_engine(store: Path | None = None) -> FakeEngine:
    state = FakeEngineState(base_model=BASE_ID, store=store)
    return FakeEngine(state=state, server=ServerThread(create_fake_engine(state)).start())


def start_gateway(data_dir: Path, engine_urls: list[str], **overrides: Any) -> GatewayHandle:
    write_base_model(data_dir / "models" / BASE_ID)
    values: dict[str, Any] = {
        "data_dir": data_dir, "engine_urls": engine_urls, "admin_key": ADMIN_KEY, "base_model_id": BASE_ID,
        "max_upload_bytes": 256 * 1024, "max_request_bytes": 64 * 1024, "max_prompt_chars": 8000,
        "engine_connect_timeout_s": 2.0, "engine_read_timeout_s": 20.0,
        "passthrough_request_fields": list(FAKE_ENGINE_KNOBS),
    }
    values.update(overrides)
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    app = create_app(settings)
    return GatewayHandle(settings=settings, server=ServerThread(app).start(), app=app)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeEngine]:
    """The fake engine test double for this module's gateway (its resolver reads the gateway's store)."""
    fake = start_fake_engine()
    yield fake
    fake.server.stop()


@pytest.fixture(scope="module", params=[True, False], ids=["fast_path", "fastapi_routes"])
def gateway(request: pytest.FixtureRequest, engine: FakeEngine, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayHandle]:
    """A gateway in front of ``engine``, with small limits so limit tests stay fast; every test using it runs
    twice, with the completion fast path on and off (the FastAPI routes)."""
    handle = start_gateway(tmp_path_factory.mktemp("gateway"), [engine.url], completion_fast_path=request.param)
    engine.state.store = handle.settings.store_dir
    yield handle
    handle.server.stop()


@pytest.fixture
def tenant(gateway: GatewayHandle) -> tuple[str, str]:
    """A fresh tenant (name, key) on the module's gateway."""
    return gateway.new_tenant()


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Any]:
    """Start extra gateways (own data folder) for tests that need other settings; stopped afterwards."""
    started: list[GatewayHandle] = []

    def make(engine_urls: list[str], data_dir: Path | None = None, **overrides: Any) -> GatewayHandle:
        handle = start_gateway(data_dir or tmp_path / f"gw{len(started)}", engine_urls, **overrides)
        started.append(handle)
        return handle

    yield make
    for handle in started:
        handle.server.stop()


@pytest.fixture
def make_engine() -> Iterator[Any]:
    """Start extra fake engines; stopped afterwards."""
    started: list[FakeEngine] = []

    def make(store: Path | None = None) -> FakeEngine:
        fake = start_fake_engine(store)
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.server.stop()
