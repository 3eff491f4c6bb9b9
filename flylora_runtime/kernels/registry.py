"""The backend registry: a name per implementation of :func:`flylora_runtime.kernels.flylora_apply`, and the
default per device (:func:`get_backend`)."""

from __future__ import annotations

import os
from typing import Callable

import torch

from flylora_runtime.kernels.cpu import apply_cpu
from flylora_runtime.kernels.reference_backend import apply_reference


def _triton_backend() -> Callable:
    # Imported on first use, not with this module: triton is optional (a CPU install may lack it), and a CPU
    # engine never needs it.
    from flylora_runtime.kernels.triton_kernels import apply_triton
    return apply_triton


#: Backend name -> a function returning the backend (called by :func:`get_backend`; only triton is
#: imported there, on first use).
BACKENDS: dict[str, Callable[[], Callable]] = {
    "cpu": lambda: apply_cpu, "triton": _triton_backend, "reference": lambda: apply_reference}


def get_backend(device: torch.device | str, name: str | None = None) -> Callable:
    """The backend for ``device``: ``name``, else ``$FLYLORA_KERNEL_BACKEND``, else triton on CUDA/ROCm
    (XPU too when triton supports it) and cpu elsewhere. Raises ``ValueError`` for an unknown name."""
    name = name or os.environ.get("FLYLORA_KERNEL_BACKEND") or (
        "cpu" if torch.device(device).type == "cpu" else "triton")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name]()
