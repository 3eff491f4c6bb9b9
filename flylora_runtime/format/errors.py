"""Adapter errors: one type per failure, each naming the file, the key, what was expected and found.

Callers (the gateway, the engine's loader) map these types to HTTP statuses once; nobody classifies an
error by matching its message.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """Base class of every adapter loading or validation failure."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        where = []
        if file:
            where.append(f"file {file!r}")
        if key:
            where.append(f"key {key[:200]!r}" + ("..." if len(key) > 200 else ""))
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class UnsafeFormat(AdapterError):
    """A pickle-based file (.bin, .pt, .pth, .ckpt, .pkl) was offered; it is refused and never opened."""


class AdapterFileMissing(AdapterError):
    """A required file (adapter_config.json or adapter_model.safetensors) is absent."""


class AdapterTooLarge(AdapterError):
    """A file exceeds the configured size limit."""


class InvalidConfig(AdapterError):
    """adapter_config.json is malformed or holds an invalid value (r, top_k, lora_alpha, routing, ...)."""


class InvalidSafetensors(AdapterError):
    """The weights file is not a well-formed safetensors file."""


class UnknownTargetModule(AdapterError):
    """A target module (or a tensor's module) does not exist in the base model."""


class MissingTensor(AdapterError):
    """A tensor the config calls for (lora_A / lora_B of a targeted module) is absent."""


class UnexpectedTensor(AdapterError):
    """A tensor that is not part of a FlyLoRA / LoRA checkpoint is present."""


class ShapeMismatch(AdapterError):
    """A tensor's shape does not match the base model and the adapter's rank."""


class DtypeNotAllowed(AdapterError):
    """A tensor is not of a floating dtype (F16, BF16, F32, F64)."""


class NonFiniteValues(AdapterError):
    """A tensor holds NaN or infinity."""


class EngineLimitExceeded(AdapterError):
    """A well-formed adapter the serving engine cannot serve (e.g. its rank is above the engine's max rank)."""


class BaseModelMismatch(AdapterError):
    """The adapter was made for a different base model (or its architecture is unsupported)."""
