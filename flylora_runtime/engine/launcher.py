"""``flylora-engine``: vLLM's OpenAI server with the FlyLoRA plugin and defaults for CPU and GPU.

    flylora-engine                                   # demo model, CPU, 127.0.0.1:8100
    flylora-engine --model /models/llama --dtype bfloat16 --adapter-store /data/adapters

Every option is a field of :class:`EngineConfig` (one place for defaults; the CLI is generated from it).
Environment overrides: ``FLYLORA_ENGINE_DTYPE``, ``FLYLORA_ENGINE_HOST``, ``FLYLORA_ENGINE_PORT``,
``FLYLORA_ADAPTER_STORE``. ``FLYLORA_ENGINE_API_KEY`` (environment only, never a flag: argv is visible to every
local user) makes every route but /health and /metrics need that key (:mod:`.auth`); it is required to listen
on a non-loopback address. The engine serves the base model under ``--served-model-name`` and resolves
any other ``model`` as an adapter id in the store (``<store>/<id>/adapter_config.json`` + weights).
Device slots and the CPU adapter cache are sized from memory unless set (:mod:`.sizing`; the arithmetic
is printed at start).

vLLM wraps only the seven projections adapters may target (``--lora-target-modules``): left to itself it
also wraps ``lm_head`` and ``embed_tokens``, and then runs a LoRA pass over the whole vocabulary for every
token of every step, adapter or not (22% of a base-only step's time on this CPU; base-model throughput on
the same engine rose 1.3x without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flylora_runtime.engine.auth import API_KEY_ENV, MIDDLEWARE, is_loopback, secret_problem
from flylora_runtime.engine.sizing import MemoryPlan, plan_for
from flylora_runtime.format.modelspec import PARENT
from flylora_runtime.paths import DEMO_MODEL_NAME, data_dir, demo_model_dir
from flylora_runtime.vllm_plugin.metrics import METRICS_DIR_ENV

DTYPES = ("auto", "bfloat16", "float16", "float32")
ENERGY_MODES = ("on", "full", "off")


def _env(name: str, default):
    return os.environ.get(name) or default


@dataclass
class EngineConfig:
    """Engine settings. Invalid values raise ``ValueError`` naming the value and what is allowed."""

    model: str = field(default_factory=lambda: str(demo_model_dir()),
                       metadata={"help": "base model: a Hugging Face checkpoint directory"})
    served_model_name: str = field(default=DEMO_MODEL_NAME, metadata={"help": "name the base model is served under"})
    adapter_store: str = field(default_factory=lambda: _env("FLYLORA_ADAPTER_STORE", str(data_dir() / "adapters")),
                               metadata={"help": "directory of adapters, one <id>/ folder each"})
    host: str = field(default_factory=lambda: _env("FLYLORA_ENGINE_HOST", "127.0.0.1"),
                      metadata={"help": "bind address (keep it internal)"})
    port: int = field(default_factory=lambda: int(_env("FLYLORA_ENGINE_PORT", 8100)), metadata={"help": "port"})
    dtype: str = field(default_factory=lambda: _env("FLYLORA_ENGINE_DTYPE", "auto"),
                       metadata={"help": f"model dtype, one of {DTYPES} (float32 for exactness checks)"})
    max_loras: int = field(default=0, metadata={
        "help": "adapters resident in device slots at once (distinct adapters per step); 0: as many as "
                "--max-num-seqs, as far as --adapter-memory-fraction of the device's memory holds them"})
    max_cpu_loras: int = field(default=0, metadata={
        "help": "adapters kept in the engine's CPU cache (LRU); 0: as many as --adapter-cache-fraction of host "
                "memory holds (at least --max-loras)"})
    adapter_memory_fraction: float = field(default=0.1, metadata={
        "help": "share of the device's memory (GPU memory; RAM on CPU) for adapter slots when --max-loras is 0"})
    adapter_cache_fraction: float = field(default=0.1, metadata={
        "help": "share of host memory for the engine's CPU adapter cache when --max-cpu-loras is 0"})
    max_lora_rank: int = field(default=32, metadata={"help": "largest adapter rank accepted"})
    max_model_len: int = field(default=2048, metadata={"help": "context length"})
    max_num_seqs: int = field(default=64, metadata={"help": "sequences batched together"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "must be 1 (FlyLoRA top-k with TP>1 is refused)"})
    kv_cache_gib: int = field(default=1, metadata={"help": "CPU only: KV cache size in GiB"})
    enforce_eager: bool = field(default=True, metadata={
        "help": "GPU: run without CUDA graphs and torch.compile. On by default until the FlyLoRA Triton path has "
                "been validated under graph capture on a GPU (no effect on CPU, where vLLM disables compilation "
                "for LoRA anyway)"})
    shutdown_timeout: int = field(default=30, metadata={
        "help": "seconds a SIGTERM lets running requests finish before the engine exits (vLLM's drain; 0: abort "
                "them at once)"})
    energy: str = field(default_factory=lambda: _env("FLYLORA_ENERGY", "on"), metadata={
        "help": "per-token statistics for quality monitoring (POST /flylora/energy): on (free energy and max "
                "probability), full (also the entropy, for evaluations), off"})
    flylora: bool = field(default=True, metadata={
        "help": "load the FlyLoRA plugin; --no-flylora runs stock vLLM LoRA (a baseline for benchmarks)"})
    api_key: str | None = field(default_factory=lambda: os.environ.get(API_KEY_ENV) or None, repr=False, metadata={
        "cli": False, "help": f"engine key shared with the gateway (from {API_KEY_ENV} only)"})

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("port", "max_lora_rank", "max_model_len", "max_num_seqs", "kv_cache_gib"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.energy not in ENERGY_MODES:
            raise ValueError(f"energy must be one of {ENERGY_MODES}, got {self.energy!r}")
        for name in ("max_loras", "max_cpu_loras"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be positive, or 0 to size it from memory; got {getattr(self, name)}")
        for name in ("adapter_memory_fraction", "adapter_cache_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.max_loras and self.max_cpu_loras and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.max_lora_rank not in (8, 16, 32, 64, 128, 256, 320, 512):
            raise ValueError(f"max_lora_rank must be one of vLLM's 8, 16, 32, 64, 128, 256, 320, 512; "
                             f"got {self.max_lora_rank}")
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size must be 1: FlyLoRA's top-k must follow the all-reduce of the "
                             f"shrink output, which is not implemented; got {self.tensor_parallel_size}")
        if self.api_key is not None and (problem := secret_problem(self.api_key)) is not None:
            raise ValueError(f"{API_KEY_ENV} is refused: {problem}")
        if self.api_key is None and not is_loopback(self.host):
            raise ValueError(f"host {self.host} is not a loopback address: set {API_KEY_ENV} (the same value as the "
                             "gateway's) so that only the gateway can reach the engine, or bind 127.0.0.1")
        if not Path(self.model, "config.json").is_file():
            raise ValueError(f"model must be a Hugging Face checkpoint directory; {self.model}/config.json "
                             "is missing (run `make model` for the demo model)")

    def environment(self, on_cpu: bool) -> dict[str, str]:
        """Environment for the vLLM process (DEVELOPERS.md's CPU settings; the plugin's store)."""
        work = data_dir() / "vllm"
        env = {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            "FLYLORA_ADAPTER_STORE": self.adapter_store,
            "FLYLORA_BASE_MODEL_DIR": self.model,
            "FLYLORA_MAX_LORA_RANK": str(self.max_lora_rank),  # the store resolver refuses larger ranks cheaply
            "VLLM_RPC_BASE_PATH": str(work / "rpc"),
            "VLLM_CACHE_ROOT": str(work / "cache"),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        env["FLYLORA_ENERGY"] = self.energy
        if not self.flylora:
            env["VLLM_PLUGINS"] = ""  # an allowlist naming no plugin: stock vLLM
        if self.api_key is not None:
            env[API_KEY_ENV] = self.api_key  # read by the middleware in vLLM's API server
        if on_cpu:
            env.update({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib)})
        return env

    def argv(self) -> list[str]:
        """This config as ``flylora-engine`` options (``build_parser().parse_args(config.argv())`` gives it back)."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            if f.metadata.get("cli") is False:
                continue  # not an option (the API key travels in the environment: EngineProcess)
            flag, value = "--" + f.name.replace("_", "-"), getattr(self, f.name)
            out += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
        return out

    def vllm_argv(self) -> list[str]:
        return [
            "--model", self.model, "--served-model-name", self.served_model_name,
            "--host", self.host, "--port", str(self.port), "--dtype", self.dtype,
            "--enable-lora", "--max-loras", str(self.max_loras), "--max-cpu-loras", str(self.max_cpu_loras),
            "--max-lora-rank", str(self.max_lora_rank), "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs), "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--generation-config", "vllm", "--disable-uvicorn-access-log",
            "--shutdown-timeout", str(self.shutdown_timeout),
            # Adapters may target only these projections (the checkpoint validator refuses anything else), so
            # vLLM need not wrap lm_head and embed_tokens. Wrapped, they cost every step a LoRA pass over the
            # vocabulary for all tokens, adapter or not: 23% of a base-only step's worker time on this CPU.
            "--lora-target-modules", *PARENT,
            *(["--enforce-eager"] if self.enforce_eager else []),
            *(["--middleware", MIDDLEWARE] if self.api_key is not None else []),
        ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flylora-engine", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(EngineConfig):
        if f.metadata.get("cli") is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(default), default=default, help=f.metadata["help"])
    return p


def on_cpu() -> bool:
    try:
        import torch
        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return True


def sized(config: EngineConfig) -> tuple[EngineConfig, MemoryPlan | None]:
    """``config`` with ``max_loras``/``max_cpu_loras`` of 0 replaced by the memory plan's numbers, and the
    plan (None when both were set and the model's shapes are unknown to the sizing)."""
    config.validate()
    try:
        memory = plan_for(config)
    except ValueError as exc:
        if config.max_loras and config.max_cpu_loras:
            return config, None
        raise ValueError(f"cannot size the adapter slots and cache from memory ({exc}); set --max-loras and "
                         "--max-cpu-loras") from exc
    return dataclasses.replace(config, max_loras=memory.max_loras, max_cpu_loras=memory.max_cpu_loras), memory


def command(config: EngineConfig) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start the engine (slot and cache counts sized: :func:`sized`)."""
    config.validate()
    if not (config.max_loras and config.max_cpu_loras):
        config = sized(config)[0]
    env = dict(os.environ)
    env.pop(METRICS_DIR_ENV, None)  # each engine gets its own counters folder (the plugin creates it)
    env.pop(API_KEY_ENV, None)  # set again below only when this config has a key
    env.update(config.environment(on_cpu()))
    for key in ("VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    Path(config.adapter_store).mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *config.vllm_argv()], env


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = EngineConfig(**vars(args))
    try:
        config, memory = sized(config)
        cmd, env = command(config)
    except ValueError as exc:
        print(f"flylora-engine: error: {exc}", file=sys.stderr)
        return 2
    for line in memory.describe() if memory else ():
        print(f"[flylora-engine] {line}", file=sys.stderr)
    print(f"[flylora-engine] {config.served_model_name} on http://{config.host}:{config.port} "
          f"(dtype {config.dtype}, {config.max_loras} slots, {config.max_cpu_loras} cached, store "
          f"{config.adapter_store})", file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
