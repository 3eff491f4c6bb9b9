"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from flylora_runtime.demo_model import is_complete
from flylora_runtime.paths import demo_model_dir as _demo_model_dir


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The converted demo model; `make test` obtains it before pytest starts (`make model`)."""
    path = _demo_model_dir()
    if not is_complete(path):
        pytest.fail(f"demo model missing at {path}: run `make model` (make test does this first)")
    return path
