"""``flylora-engine``: vLLM's OpenAI server with the FlyLoRA plugin and defaults for CPU and GPU.

    flylora-engine                                   # demo model, CPU, 127.0.0.1:8100
    flylora-engine --model /models/llama --dtype bfloat16 --adapter-store /data/adapters
    flylora-engine --online --model Qwen/Qwen2.5-7B-Instruct   # a Hugging Face id, downloaded on first start

Every option is a field of :class:`EngineConfig` (one place for defaults; the CLI is generated from it).
Environment overrides: ``FLYLORA_ENGINE_DTYPE``, ``FLYLORA_ENGINE_HOST``, ``FLYLORA_ENGINE_PORT``,
``FLYLORA_ADAPTER_STORE``, ``FLYLORA_ENGINE_ONLINE``. ``FLYLORA_ENGINE_API_KEY`` (environment only, never a
flag: argv is visible to every local user) makes every route but /health and /metrics need that key
(:mod:`.auth`); it is required to listen on a non-loopback address. The engine serves the base model under
``--served-model-name`` (default: the folder's name, or the model id) and resolves any other ``model`` as an
adapter id in the store (``<store>/<id>/adapter_config.json`` + weights). Device slots and the CPU adapter
cache are sized from memory unless set (:mod:`.sizing`; the arithmetic is printed at start).

The model is a local checkpoint folder or a Hugging Face model id. Offline is the default
(``HF_HUB_OFFLINE=1``: nothing is downloaded, an id must already be in the local Hugging Face cache);
``--online`` lets vLLM download the model and its tokenizer.

vLLM wraps only the seven projections adapters may target (``--lora-target-modules``): left to itself it
also wraps ``lm_head`` and ``embed_tokens``, and then runs a LoRA pass over the whole vocabulary for every
token of every step, adapter or not (22% of a base-only step's time on this CPU; base-model throughput on
the same engine rose 1.3x without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
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
#: A Hugging Face model id: ``name`` or ``owner/name`` (letters, digits, ``-``, ``_``, ``.``).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _env(name: str, default):
    return os.environ.get(name) or default


def _flag(name: str) -> bool:
    value = _env(name, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{name} must be one of {_TRUE + _FALSE[1:]}, got {os.environ[name]!r}")
    return value in _TRUE


def _online_default() -> bool:
    return _flag("FLYLORA_ENGINE_ONLINE")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


@dataclass
class EngineConfig:
    """Engine settings. Invalid values raise ``ValueError`` naming the value and what is allowed."""

    model: str = field(default_factory=lambda: str(demo_model_dir()), metadata={
        "help": "base model: a Hugging Face checkpoint folder, or a Hugging Face model id (owner/name) that is "
                "in the local Hugging Face cache or, with --online, is downloaded"})
    served_model_name: str = field(default="", metadata={
        "help": "name the base model is served under (default: the folder's name, or the model id); the "
                f"gateway's FLYLORA_BASE_MODEL_ID must equal it (the demo model's is {DEMO_MODEL_NAME})"})
    online: bool = field(default_factory=_online_default, metadata={
        "help": "allow Hugging Face downloads of the model and tokenizer (env FLYLORA_ENGINE_ONLINE=1); off: "
                "HF_HUB_OFFLINE=1, local folders and the local Hugging Face cache only"})
    revision: str = field(default="", metadata={"help": "model revision (branch, tag or commit) of a model id"})
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
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "GPU only: share of the GPU's memory the engine may take (weights, adapter slots, activations, "
                "and the KV cache, which gets the rest)"})
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

    def __post_init__(self) -> None:
        if not self.served_model_name:
            self.served_model_name = self.model if self.is_hub_id() else Path(self.model).name

    def is_hub_id(self) -> bool:
        """True when ``model`` names a Hugging Face model rather than a folder (an existing folder wins)."""
        return not Path(self.model).is_dir() and HUB_ID.fullmatch(self.model) is not None

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
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.revision and not self.is_hub_id():
            raise ValueError("revision applies to a Hugging Face model id, not to the folder "
                             f"{self.model!r}")
        if not self.is_hub_id():
            if not Path(self.model).is_dir():
                raise ValueError(f"model {self.model!r} is neither a folder nor a Hugging Face model id "
                                 "(owner/name)")
            if not Path(self.model, "config.json").is_file():
                raise ValueError(f"model must be a Hugging Face checkpoint directory; {self.model}/config.json "
                                 "is missing (run `make model` for the demo model)")
        elif not self.online and self.cached_config() is None:
            raise ValueError(f"model {self.model!r} is not a local folder and not in the local Hugging Face cache "
                             f"({_hub_cache()}); pass --online (or FLYLORA_ENGINE_ONLINE=1) to download it, or "
                             "give the path of a checkpoint folder")

    def cached_config(self) -> Path | None:
        """The model id's ``config.json`` in the local Hugging Face cache, if there (no network)."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.model, "config.json", revision=self.revision or None)
        return Path(found) if isinstance(found, str) else None

    def config_dir(self) -> str:
        """A folder holding the base model's ``config.json``, which the plugin validates adapters against.

        A local model: the folder itself. A model id: its snapshot in the Hugging Face cache, which online
        mode fills first with ``config.json`` (vLLM then downloads the rest into the same cache).
        """
        if not self.is_hub_id():
            return self.model
        cached = self.cached_config()
        if cached is None:
            from huggingface_hub import hf_hub_download

            try:
                cached = Path(hf_hub_download(self.model, "config.json", revision=self.revision or None))
            except Exception as exc:  # network, authentication, missing repo: all say why
                raise ValueError(f"cannot fetch {self.model}'s config.json from Hugging Face: {exc}") from exc
        return str(cached.parent)

    def environment(self, on_cpu: bool, config_dir: str | None = None) -> dict[str, str]:
        """Environment for the vLLM process (DEVELOPERS.md's CPU settings; the plugin's store).

        ``config_dir``: where the base model's config.json is (:meth:`config_dir`; default ``model``).
        """
        work = data_dir() / "vllm"
        env = {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            "FLYLORA_ADAPTER_STORE": self.adapter_store,
            "FLYLORA_BASE_MODEL_DIR": config_dir or self.model,
            "FLYLORA_MAX_LORA_RANK": str(self.max_lora_rank),  # the store resolver refuses larger ranks cheaply
            "VLLM_RPC_BASE_PATH": str(work / "rpc"),
            "VLLM_CACHE_ROOT": str(work / "cache"),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            # Explicit both ways: an HF_HUB_OFFLINE=1 inherited from the shell must not defeat --online.
            "HF_HUB_OFFLINE": "0" if self.online else "1",
            "TRANSFORMERS_OFFLINE": "0" if self.online else "1",
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
            "--gpu-memory-utilization", str(self.gpu_memory_utilization),
            *(["--revision", self.revision] if self.revision else []),
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
    except (ValueError, KeyError, OSError) as exc:  # a config.json without a field the sizing reads, unreadable
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
    env.update(config.environment(on_cpu(), config.config_dir()))
    for key in ("VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    Path(config.adapter_store).mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *config.vllm_argv()], env


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config, memory = sized(EngineConfig(**vars(args)))
        cmd, env = command(config)
    except ValueError as exc:
        print(f"flylora-engine: error: {exc}", file=sys.stderr)
        return 2
    for line in memory.describe() if memory else ():
        print(f"[flylora-engine] {line}", file=sys.stderr)
    print(f"[flylora-engine] {config.served_model_name} ({config.model}, "
          f"{'online' if config.online else 'offline'}) on http://{config.host}:{config.port} "
          f"(dtype {config.dtype}, {config.max_loras} slots, {config.max_cpu_loras} cached, store "
          f"{config.adapter_store}); the gateway's FLYLORA_BASE_MODEL_ID={config.served_model_name} and "
          f"FLYLORA_BASE_MODEL_DIR={env['FLYLORA_BASE_MODEL_DIR']}", file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
