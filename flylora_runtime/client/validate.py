"""Check an adapter folder on the client before uploading it, with the gateway's own validator
(:mod:`flylora_runtime.format`, torch-free, nothing unpickled).

With the base model's ``config.json`` (``--base-config``) the check is the gateway's exactly: every tensor's
name, dtype and shape against the base model, all values finite. Without it, the base model's projection
shapes are taken from the adapter's own ``lora_A`` / ``lora_B`` tensors (layer 0 of each target), and the
same validator then checks the rest against them: the config, the file format, that every layer has the
same shapes and every expected tensor is there, dtypes, finiteness. Only a mismatch with the real base
model's shapes is left for the gateway to find.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from flylora_runtime.format.checkpoint import (
    CONFIG_NAME,
    DEFAULT_MAX_BYTES,
    KEY_PREFIX,
    MAX_CONFIG_BYTES,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    AdapterManifest,
    TensorInfo,
    read_header,
    refuse_pickle,
    validate_files,
)
from flylora_runtime.format.config import FlyLoRAConfig
from flylora_runtime.format.errors import AdapterError, AdapterFileMissing, AdapterTooLarge, MissingTensor
from flylora_runtime.format.modelspec import BaseModelSpec

_MODULE = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


def adapter_files(folder: Path) -> tuple[Path, Path]:
    """The folder's config and weights; a pickle-only checkpoint is refused without being opened."""
    if not folder.is_dir():
        raise AdapterFileMissing(f"expected an adapter folder, found {'a file' if folder.exists() else 'nothing'}",
                                 file=str(folder))
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        for suffix in PICKLE_SUFFIXES:
            pickled = folder / ("adapter_model" + suffix)
            if pickled.exists():
                refuse_pickle(pickled)
                raise AdapterFileMissing(f"expected {WEIGHTS_NAME}, found only {pickled.name}", file=pickled.name)
    for path in (folder / CONFIG_NAME, weights):
        if not path.is_file():
            raise AdapterFileMissing(f"expected {path.name} in {folder}, found none", file=path.name)
    return folder / CONFIG_NAME, weights


def base_spec(path: Path) -> BaseModelSpec:
    """A base model's shapes from its ``config.json`` (or the folder holding it)."""
    config = path / "config.json" if path.is_dir() else path
    try:
        return BaseModelSpec.from_hf_config(json.loads(config.read_text(encoding="utf-8")), name=str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"cannot read the base model's config ({type(exc).__name__}: {exc})",
                           file=str(config)) from None


def spec_from_tensors(config: FlyLoRAConfig, tensors: dict[str, TensorInfo]) -> BaseModelSpec:
    """The base shapes the adapter implies: (in, out) of each target from its lora_A [r, in] and lora_B [out, r]."""
    found: dict[str, dict[str, int]] = {}
    layers = 0
    for key, info in tensors.items():
        m = _MODULE.fullmatch(key[len(KEY_PREFIX):]) if key.startswith(KEY_PREFIX) else None
        if m is None or len(info.shape) != 2:
            continue
        layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
        layers = max(layers, layer + 1)
        if layer == 0:
            found.setdefault(proj, {})["in" if ab == "A" else "out"] = info.shape[1] if ab == "A" else info.shape[0]
    shapes = {}
    for target in config.target_modules:
        dims = found.get(target, {})
        if "in" not in dims or "out" not in dims:
            raise MissingTensor(f"expected lora_A and lora_B tensors of {target!r} in layer 0, found "
                                f"{sorted(dims) or 'none'}", file=WEIGHTS_NAME, key=target)
        shapes[target] = (dims["in"], dims["out"])
    return BaseModelSpec(model_type="llama", num_layers=max(layers, 1), shapes=shapes,
                         name="the shapes of the adapter's own layer 0")


def validate_folder(folder: Path, *, base_config: Path | None = None,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> AdapterManifest:
    """Validate an adapter folder; its manifest, or an :class:`AdapterError` naming the file and field."""
    config_path, weights_path = adapter_files(folder)
    if base_config is not None:
        spec = base_spec(base_config)
    else:
        size = os.path.getsize(config_path)
        if size > MAX_CONFIG_BYTES:
            raise AdapterTooLarge(f"expected at most {MAX_CONFIG_BYTES} bytes, found {size}", file=CONFIG_NAME)
        refuse_pickle(weights_path)
        config = FlyLoRAConfig.from_json_bytes(config_path.read_bytes(), file=CONFIG_NAME)
        spec = spec_from_tensors(config, read_header(weights_path))
    return validate_files(config_path, weights_path, spec, max_bytes=max_bytes)
