"""The trained demo adapters, cached in the data folder.

``ensure_trained(task)`` returns ``data_dir()/demo-adapters/<task>/``, training it first unless the folder
already holds an adapter whose ``cache_key.json`` matches the key of (the task's data, the training
hyperparameters, the trainer's and tasks' source code). A second ``make serve`` reuses it; changing any of
the three retrains. The folder is replaced atomically (trained into a temporary sibling, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from flylora_runtime.format.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from flylora_runtime.paths import data_dir
from flylora_runtime.training.trainer import TrainConfig
from flylora_runtime.demo.tasks import TASKS, get_task

KEY_NAME = "cache_key.json"

#: The demo adapters' training: the paper's adapter (r=32, top_k=8, alpha=64, bias_u=1e-3, all seven
#: projections), a short CPU run. Per-task overrides below.
DEMO_TRAIN = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup=3)
DEMO_TRAIN_PER_TASK: dict[str, dict] = {}

_SOURCES = ("training/trainer.py", "demo/tasks/__init__.py", "demo/tasks/builtin.py")


def train_config(task: str) -> TrainConfig:
    return replace(DEMO_TRAIN, **DEMO_TRAIN_PER_TASK.get(task, {}))


def code_version() -> str:
    """sha256 over the trainer's and the tasks' source files."""
    root = Path(__file__).resolve().parents[1]  # flylora_runtime/
    h = hashlib.sha256()
    for rel in _SOURCES:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return h.hexdigest()


def cache_key(task: str, cfg: TrainConfig) -> dict:
    return {"task": task, "data": get_task(task).data_hash(), "config": cfg.to_json(), "code": code_version()}


def cached(task: str, root: Path | None = None) -> Path | None:
    """The cached adapter folder if it is complete and its key matches, else None."""
    path = (root or data_dir() / "demo-adapters") / task
    try:
        key = json.loads((path / KEY_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    complete = (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
    return path if complete and key == cache_key(task, train_config(task)) else None


def ensure_trained(task: str, *, model_dir: str | os.PathLike, root: Path | None = None, progress: bool = True,
                   log=None) -> Path:
    """The trained adapter of ``task`` (cached, or trained now: a few CPU minutes)."""
    root = root or data_dir() / "demo-adapters"
    hit = cached(task, root)
    if hit is not None:
        return hit
    from flylora_runtime.training.trainer import load_model, train

    cfg = train_config(task)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"training demo adapter {task!r} ({cfg.steps} steps x {cfg.batch_size} examples; a few CPU minutes)")
    _threads_for_a_busy_machine()
    model, tok = load_model(model_dir)
    examples = [e.chat() for e in get_task(task).train()]
    result = train(model, tok, examples, cfg, base_name="SmolLM2-135M-Instruct", progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is the served adapter
    try:
        result.adapter.save(tmp)
        (tmp / "training.json").write_text(json.dumps({
            "task": task, "steps": cfg.steps, "examples": len(examples), "seconds": round(result.seconds, 1),
            "loss_first": round(result.losses[0], 4), "loss_last": round(result.losses[-1], 4),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, indent=2) + "\n")
        (tmp / KEY_NAME).write_text(json.dumps(cache_key(task, cfg), indent=2) + "\n")
        final = root / task
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"trained {task!r} in {result.seconds:.0f} s (loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, "
        f"load average {os.getloadavg()[0]:.1f})")
    return final


def _threads_for_a_busy_machine() -> None:
    """One torch thread when the machine is busier than its cores (measured here: a training step is up to
    4x faster single-threaded on 2 shared cores than with two threads that keep waiting for each other)."""
    import torch

    cores = os.cpu_count() or 1
    if os.getloadavg()[0] >= cores:
        torch.set_num_threads(1)


def ensure_all(model_dir: str | os.PathLike, **kw) -> dict[str, Path]:
    return {name: ensure_trained(name, model_dir=model_dir, **kw) for name in TASKS}
