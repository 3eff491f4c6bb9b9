"""The system under test: an engine and a gateway as child processes, a tenant, adapters uploaded through the API.

As ``make serve`` does (server/stack.py), but on free loopback ports, in a fresh data folder per run (registry
and adapter store), with the gateway's per-tenant limits lifted so they never shape the load. Adapters are
generated once per kind into a cache (``<data>/loadtests/adapters/<kind>/<i>``) and uploaded by every run
through ``POST /v1/adapters``, exactly as a tenant would.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx

from flylora_runtime.client import GatewayClient
from flylora_runtime.engine.launcher import EngineConfig
from flylora_runtime.engine.process import EngineProcess, GatewayProcess, free_port
from flylora_runtime.paths import data_dir, demo_model_dir

TENANT = "loadtest"


@dataclass(frozen=True)
class AdapterKind:
    """A family of generated adapters: ``top_k=None`` is plain PEFT LoRA (for vLLM's native LoRA)."""

    name: str
    r: int = 32
    top_k: int | None = 8
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    d_std: float = 0.01


FLYLORA_FULL = AdapterKind("fly-r32k8-all")
FLYLORA_QV = AdapterKind("fly-r32k8-qv", targets=("q_proj", "v_proj"))
LORA_FULL = AdapterKind("lora-r32-all", top_k=None, d_std=0.0)
LORA_QV = AdapterKind("lora-r32-qv", top_k=None, d_std=0.0, targets=("q_proj", "v_proj"))


def _log(msg: str) -> None:
    print(f"[loadtests] {msg}", file=sys.stderr, flush=True)


def ensure_adapters(kind: AdapterKind, count: int, cache: Path | None = None) -> list[Path]:
    """Folders of ``count`` adapters of ``kind`` (seeds 0..count-1), generated once and cached."""
    root = (cache or data_dir() / "loadtests" / "adapters") / kind.name
    folders = [root / f"{i:04d}" for i in range(count)]
    missing = [f for f in folders if not (f / "adapter_model.safetensors").is_file()]
    if missing:
        import torch

        from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter
        from flylora_runtime.format.modelspec import BaseModelSpec

        torch.set_num_threads(1)
        base = BaseModelSpec.from_pretrained(demo_model_dir())
        _log(f"generating {len(missing)} {kind.name} adapters into {root}")
        for f in missing:
            seed = int(f.name)
            spec = GenerateSpec(r=kind.r, top_k=kind.top_k, targets=kind.targets, d_std=kind.d_std,
                                seed=10_000 + seed)
            generate_adapter(base, spec).save(f)
    return folders


class Stack:
    """Engine + gateway children. ``with Stack(EngineConfig-fields, workdir) as s:`` then ``s.gateway_url``,
    ``s.tenant_key`` (a fresh tenant), ``await s.upload(...)``."""

    def __init__(self, workdir: Path, *, flylora: bool = True, max_loras: int = 16, max_cpu_loras: int = 64,
                 max_num_seqs: int = 64, dtype: str = "auto", gateway_settings: dict[str, object] | None = None):
        """``max_loras``/``max_cpu_loras`` 0: sized from memory as by default; ``max_num_seqs`` 0: the default;
        ``gateway_settings``: more gateway settings by field name, over the ones set here (e.g.
        ``{"admission_in_flight_per_engine": 8}``). ``self.gateway_settings``: all of them."""
        self.workdir = workdir
        self.store = workdir / "store"
        seqs = {"max_num_seqs": max_num_seqs} if max_num_seqs else {}
        self.engine_config = EngineConfig(model=str(demo_model_dir()), adapter_store=str(self.store),
                                          port=free_port(), dtype=dtype, max_loras=max_loras,
                                          max_cpu_loras=max_cpu_loras, flylora=flylora, **seqs)
        self.admin_key = "flk-admin-" + secrets.token_hex(16)
        self.gateway_port = free_port()
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        self.gateway_settings: dict[str, object] = {
            "data_dir": self.workdir, "adapter_store": self.store, "base_model_dir": demo_model_dir(),
            "admin_key": self.admin_key, "engine_urls": [f"http://127.0.0.1:{self.engine_config.port}"],
            "max_concurrency_per_tenant": 100000, "tokens_per_minute_per_tenant": 0,
            # one benchmark tenant holds every adapter of a run (the adapters curve uploads 1,000)
            "max_adapters_per_tenant": 0, "max_stored_bytes_per_tenant": 0,
            # Stack.upload sends 4 at a time; a tenant may have 2 uploads in progress by default (runs got 429s)
            "max_uploads_per_tenant": 8,
            # Fair admission off unless a scenario turns it on (docs/RELIABILITY.md): it would shape the load.
            "admission_in_flight_per_engine": 0, **(gateway_settings or {})}
        self.engine: EngineProcess | None = None
        self.gateway: GatewayProcess | None = None
        self.tenant_key = ""
        self._registered: set[str] = set()

    def describe(self) -> dict:
        c = self.engine.config if self.engine is not None else self.engine_config  # sized once started
        return {"flylora": c.flylora, "dtype": c.dtype, "max_loras": c.max_loras, "max_cpu_loras": c.max_cpu_loras,
                "max_num_seqs": c.max_num_seqs, "max_lora_rank": c.max_lora_rank, "model": Path(c.model).name}

    def __enter__(self) -> Self:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.store.mkdir(parents=True)
        t0 = time.monotonic()
        _log(f"starting engine ({'FlyLoRA' if self.engine_config.flylora else 'stock vLLM LoRA'}) "
             f"on {self.engine_config.host}:{self.engine_config.port}")
        self.gateway = GatewayProcess(self.workdir / "gateway.log", port=self.gateway_port, ready_timeout=120,
                                      grace=15, settings=self.gateway_settings)
        self.engine = EngineProcess(self.engine_config, self.workdir / "engine.log")
        try:
            self.gateway.spawn()
            self.engine.start()
            self.gateway.wait_ready(children=[self.engine])
            with GatewayClient(self.gateway_url, self.admin_key, timeout=30, trust_env=False) as admin:
                self.tenant_key = admin.create_tenant(TENANT)
        except BaseException:
            self.__exit__()
            raise
        _log(f"engine + gateway ready in {time.monotonic() - t0:.0f} s ({self.gateway_url})")
        return self

    def __exit__(self, *exc) -> None:
        for child in (self.gateway, self.engine):
            if child is not None:
                child.stop()

    def rss_bytes(self) -> int:
        return self.engine.rss_bytes() if self.engine else 0

    async def upload(self, names: list[str], folders: list[Path], parallel: int = 4) -> None:
        """Upload adapters through the public API (multipart), ``parallel`` at a time; raise on any failure."""
        t0 = time.monotonic()
        with GatewayClient(self.gateway_url, self.tenant_key, trust_env=False) as client:
            await asyncio.to_thread(client.upload_adapters, zip(names, folders, strict=True), parallel=parallel)
        _log(f"uploaded {len(names)} adapters in {time.monotonic() - t0:.1f} s")
        if not self.engine_config.flylora:
            await self.register_with_stock_engine()

    async def register_with_stock_engine(self) -> None:
        """Stock vLLM has no resolver for the store: name every stored adapter to it by its internal id.

        The gateway sends the internal id (the store folder's name) upstream as ``model``; vLLM's
        ``POST /v1/load_lora_adapter {lora_name, lora_path}`` makes that name known. Already known: skipped.
        """
        engine = f"http://{self.engine_config.host}:{self.engine_config.port}"
        todo = sorted(p for p in self.store.iterdir() if p.name.startswith("fl-") and p.name not in self._registered)
        async with httpx.AsyncClient(base_url=engine, timeout=300, trust_env=False) as client:
            for folder in todo:
                r = await client.post("/v1/load_lora_adapter", json={"lora_name": folder.name,
                                                                      "lora_path": str(folder)})
                if r.status_code != 200:
                    raise RuntimeError(f"stock engine refused {folder.name}: {r.status_code} {r.text[:300]}")
                self._registered.add(folder.name)
        _log(f"named {len(todo)} adapters to the stock vLLM engine (load_lora_adapter)")
