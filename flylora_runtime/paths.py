"""Where the project keeps its data: one folder, ``FLYLORA_DATA_DIR`` (default ``<repo>/.work``)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"


def data_dir() -> Path:
    """The data folder (git-ignored): models, adapter store, registry, caches."""
    return Path(os.environ.get("FLYLORA_DATA_DIR") or REPO_ROOT / ".work")


def demo_model_dir() -> Path:
    """The converted demo base model (a Hugging Face checkpoint directory)."""
    return Path(os.environ.get("FLYLORA_BASE_MODEL_DIR") or data_dir() / "models" / DEMO_MODEL_NAME)
