"""``flylora-engine``: vLLM's OpenAI server with the FlyLoRA plugin and defaults for CPU and GPU.

    flylora-engine                                   # demo model, CPU, 127.0.0.1:8100
    flylora-engine --model /models/llama --dtype bfloat16 --max-loras 16 --adapter-store /data/adapters

Every option is a field of :class:`EngineConfig` (one place for defaults; the CLI is generated from it).
Environment overrides: ``FLYLORA_ENGINE_DTYPE``, ``FLYLORA_ENGINE_HOST``, ``FLYLORA_ENGINE_PORT``,
``FLYLORA_ADAPTER_STORE``. The engine serves the base model under ``--served-model-name`` and resolves
any other ``model`` as an adapter id in the store (``<store>/<id>/adapter_config.json`` + weights).

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
    max_loras: int = field(default=4, metadata={"help": "adapters resident in device slots at once"})
    max_cpu_loras: int = field(default=16, metadata={"help": "adapters kept in the engine's CPU cache (LRU)"})
    max_lora_rank: int = field(default=32, metadata={"help": "largest adapter rank accepted"})
    max_model_len: int = field(default=2048, metadata={"help": "context length"})
    max_num_seqs: int = field(default=64, metadata={"help": "sequences batched together"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "must be 1 (FlyLoRA top-k with TP>1 is refused)"})
    kv_cache_gib: int = field(default=1, metadata={"help": "CPU only: KV cache size in GiB"})
    enforce_eager: bool = field(default=True, metadata={
        "help": "GPU: run without CUDA graphs and torch.compile. On by default until the FlyLoRA Triton path has "
                "been validated under graph capture on a GPU (no effect on CPU, where vLLM disables compilation "
                "for LoRA anyway)"})
    energy: str = field(default_factory=lambda: _env("FLYLORA_ENERGY", "on"), metadata={
        "help": "per-token statistics for quality monitoring (POST /flylora/energy): on (free energy and max "
                "probability), full (also the entropy, for evaluations), off"})
    flylora: bool = field(default=True, metadata={
        "help": "load the FlyLoRA plugin; --no-flylora runs stock vLLM LoRA (a baseline for benchmarks)"})

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("port", "max_loras", "max_cpu_loras", "max_lora_rank", "max_model_len", "max_num_seqs",
                     "kv_cache_gib"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.energy not in ENERGY_MODES:
            raise ValueError(f"energy must be one of {ENERGY_MODES}, got {self.energy!r}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.max_lora_rank not in (8, 16, 32, 64, 128, 256, 320, 512):
            raise ValueError(f"max_lora_rank must be one of vLLM's 8, 16, 32, 64, 128, 256, 320, 512; "
                             f"got {self.max_lora_rank}")
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size must be 1: FlyLoRA's top-k must follow the all-reduce of the "
                             f"shrink output, which is not implemented; got {self.tensor_parallel_size}")
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
        if on_cpu:
            env.update({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib)})
        return env

    def vllm_argv(self) -> list[str]:
        return [
            "--model", self.model, "--served-model-name", self.served_model_name,
            "--host", self.host, "--port", str(self.port), "--dtype", self.dtype,
            "--enable-lora", "--max-loras", str(self.max_loras), "--max-cpu-loras", str(self.max_cpu_loras),
            "--max-lora-rank", str(self.max_lora_rank), "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs), "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--generation-config", "vllm", "--disable-uvicorn-access-log",
            # Adapters may target only these projections (the checkpoint validator refuses anything else), so
            # vLLM need not wrap lm_head and embed_tokens. Wrapped, they cost every step a LoRA pass over the
            # vocabulary for all tokens, adapter or not: 23% of a base-only step's worker time on this CPU.
            "--lora-target-modules", *PARENT,
            *(["--enforce-eager"] if self.enforce_eager else []),
        ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flylora-engine", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(EngineConfig):
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


def command(config: EngineConfig) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start the engine."""
    config.validate()
    env = dict(os.environ)
    env.pop(METRICS_DIR_ENV, None)  # each engine gets its own counters folder (the plugin creates it)
    env.update(config.environment(on_cpu()))
    for key in ("VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    Path(config.adapter_store).mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *config.vllm_argv()], env


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = EngineConfig(**vars(args))
    try:
        cmd, env = command(config)
    except ValueError as exc:
        print(f"flylora-engine: error: {exc}", file=sys.stderr)
        return 2
    print(f"[flylora-engine] {config.served_model_name} on http://{config.host}:{config.port} "
          f"(dtype {config.dtype}, {config.max_loras} slots, {config.max_cpu_loras} cached, store "
          f"{config.adapter_store})", file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
