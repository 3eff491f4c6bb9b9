"""Validate a FlyLoRA / PEFT LoRA checkpoint against a base model, without torch and without unpickling.

This is the gate every adapter passes before it is stored or served. It reads the safetensors header
as JSON, checks every key, dtype and shape against the base model and the config, then checks that all
values are finite by looking at raw IEEE bits through a read-only memory map. Nothing here imports torch,
so the gateway can run it (off its event loop) on an upload.

Expected tensors, for every targeted module ``M`` (e.g. ``model.layers.0.self_attn.q_proj``)::

    base_model.model.M.lora_A.weight      [r, in]
    base_model.model.M.lora_B.weight      [out, r]
    base_model.model.M.lora_topk_bias     [r]        (FlyLoRA only; absent in plain PEFT LoRA)
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from flylora_runtime.format.config import FlyLoRAConfig
from flylora_runtime.format.errors import (
    AdapterFileMissing,
    AdapterTooLarge,
    DtypeNotAllowed,
    InvalidSafetensors,
    MissingTensor,
    NonFiniteValues,
    ShapeMismatch,
    UnexpectedTensor,
    UnknownTargetModule,
    UnsafeFormat,
)
from flylora_runtime.format.modelspec import BaseModelSpec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

#: Default size limit for one weights file: the authors' Llama-3.1-8B adapter is ~336 MB.
DEFAULT_MAX_BYTES = 1 << 30
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

#: safetensors dtype -> (bytes per element, exponent mask for the non-finite test, unsigned view dtype)
FLOAT_DTYPES: dict[str, tuple[int, int, str]] = {
    "F16": (2, 0x7C00, "<u2"),
    "BF16": (2, 0x7F80, "<u2"),
    "F32": (4, 0x7F800000, "<u4"),
    "F64": (8, 0x7FF0000000000000, "<u8"),
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class AdapterManifest:
    """What validation learned about an adapter: enough to register and describe it.

    Attributes:
        config: the parsed config.
        modules: module paths the adapter adapts, sorted.
        tensors: tensor key -> :class:`TensorInfo`.
        weights_bytes: size of the weights file.
        sha256: hex digest of the weights file.
    """

    config: FlyLoRAConfig
    modules: tuple[str, ...]
    tensors: dict[str, TensorInfo] = field(repr=False)
    weights_bytes: int
    sha256: str


def lora_keys(module: str) -> tuple[str, str, str]:
    """The three tensor keys of one module in the authors' format: A, B, d."""
    base = KEY_PREFIX + module
    return base + ".lora_A.weight", base + ".lora_B.weight", base + ".lora_topk_bias"


def refuse_pickle(path: str | os.PathLike, display: str | None = None) -> None:
    """Raise :class:`UnsafeFormat` for pickle-based names or contents; never unpickles anything."""
    base_name = os.path.basename(os.fspath(path))
    name = display or base_name
    if name.lower().endswith(PICKLE_SUFFIXES) or base_name.lower().endswith(PICKLE_SUFFIXES):
        name = name if name.lower().endswith(PICKLE_SUFFIXES) else base_name
        raise UnsafeFormat(
            "pickle-based checkpoints are refused and never opened; save the adapter with safetensors "
            "(PEFT: save_pretrained(..., safe_serialization=True))", file=name)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except FileNotFoundError:
        return
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head == b"PK\x03\x04":
        raise UnsafeFormat(
            "the file is a pickle or a torch.save archive, not safetensors; it is refused and never opened",
            file=name)


def read_header(path: str | os.PathLike, display: str | None = None) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check its offsets; raise :class:`InvalidSafetensors`."""
    name = display or os.path.basename(os.fspath(path))
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise InvalidSafetensors(f"expected an 8-byte header length, found a {size}-byte file", file=name)
        (hlen,) = struct.unpack("<Q", raw_len)
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            raise InvalidSafetensors(
                f"expected a header length within the file ({size} bytes), found {hlen}", file=name)
        try:
            header = json.loads(fh.read(hlen).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidSafetensors(f"expected a JSON header, found a parse error: {exc}", file=name) from None
    if not isinstance(header, dict):
        raise InvalidSafetensors("expected the header to be a JSON object", file=name)
    data_start = 8 + hlen
    out: dict[str, TensorInfo] = {}
    spans = []
    for key, ent in header.items():
        if key == "__metadata__":
            continue
        if (not isinstance(ent, dict) or not isinstance(ent.get("dtype"), str)
                or not isinstance(ent.get("shape"), list) or not isinstance(ent.get("data_offsets"), list)
                or len(ent["data_offsets"]) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                           for v in ent["shape"] + ent["data_offsets"])):
            raise InvalidSafetensors("expected {dtype, shape, data_offsets} of integers", file=name, key=key)
        begin, end = ent["data_offsets"]
        if begin > end or data_start + end > size:
            raise InvalidSafetensors(
                f"expected data offsets within the file, found [{begin}, {end}] for a {size - data_start}-byte "
                "data section", file=name, key=key)
        dtype = ent["dtype"]
        if dtype in FLOAT_DTYPES:
            numel = int(np.prod(ent["shape"], dtype=np.int64)) if ent["shape"] else 1
            if numel * FLOAT_DTYPES[dtype][0] != end - begin:
                raise InvalidSafetensors(
                    f"expected {numel * FLOAT_DTYPES[dtype][0]} bytes for shape {ent['shape']} {dtype}, "
                    f"found {end - begin}", file=name, key=key)
        out[key] = TensorInfo(dtype=dtype, shape=tuple(ent["shape"]), start=data_start + begin, end=data_start + end)
        spans.append((begin, end, key))
    spans.sort()
    for (b0, e0, k0), (b1, _e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise InvalidSafetensors(f"expected non-overlapping tensors, found {k0!r} overlapping", file=name, key=k1)
    return out


def expected_modules(config: FlyLoRAConfig, base: BaseModelSpec, *, file: str = CONFIG_NAME) -> tuple[str, ...]:
    """Module paths the config targets on ``base``; :class:`UnknownTargetModule` for unknown names."""
    for t in config.target_modules:
        if t not in base.shapes:
            raise UnknownTargetModule(
                f"expected target modules among {sorted(base.shapes)} of {base.name}, found {t!r}",
                file=file, key="target_modules")
    layers = config.raw.get("layers_to_transform")
    if layers is None:
        layer_list = list(range(base.num_layers))
    else:
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        bad = [x for x in layer_list if not isinstance(x, int) or not 0 <= x < base.num_layers]
        if bad:
            raise UnknownTargetModule(
                f"expected layer indices in [0, {base.num_layers}), found {bad}", file=file, key="layers_to_transform")
    return tuple(sorted(base.module_path(layer, t) for layer in layer_list for t in config.target_modules))


def validate_tensors(
    config: FlyLoRAConfig, tensors: dict[str, TensorInfo], base: BaseModelSpec, *, file: str = WEIGHTS_NAME
) -> tuple[str, ...]:
    """Check keys, dtypes and shapes; return the adapted module paths."""
    modules = expected_modules(config, base)
    expected: dict[str, tuple[int, ...]] = {}
    for m in modules:
        n_in, n_out = base.shape_of(m)
        ka, kb, kd = lora_keys(m)
        expected[ka] = (config.r, n_in)
        expected[kb] = (n_out, config.r)
        if config.is_flylora:
            expected[kd] = (config.r,)
    for key, info in tensors.items():
        if key not in expected:
            module = key[len(KEY_PREFIX):].rsplit(".lora_", 1)[0] if key.startswith(KEY_PREFIX) else None
            if module is not None and base.parse_module_path(module) is None and ".lora_" in key:
                raise UnknownTargetModule(f"expected a module of {base.name}, found {module!r}", file=file, key=key)
            if key.endswith(".lora_topk_bias") and not config.is_flylora:
                raise UnexpectedTensor(
                    "found a FlyLoRA routing bias but the config has no top_k; add \"top_k\" to adapter_config.json",
                    file=file, key=key)
            raise UnexpectedTensor(
                "expected only lora_A.weight, lora_B.weight and lora_topk_bias of targeted modules, "
                f"found an extra tensor of shape {list(info.shape)}", file=file, key=key)
        if info.dtype not in FLOAT_DTYPES:
            raise DtypeNotAllowed(f"expected a floating dtype {sorted(FLOAT_DTYPES)}, found {info.dtype}",
                                  file=file, key=key)
        if info.shape != expected[key]:
            raise ShapeMismatch(f"expected shape {list(expected[key])}, found {list(info.shape)}", file=file, key=key)
    for key in expected:
        if key not in tensors:
            raise MissingTensor(f"expected a tensor of shape {list(expected[key])}, found none", file=file, key=key)
    return modules


def check_finite(path: str | os.PathLike, tensors: dict[str, TensorInfo], *, file: str = WEIGHTS_NAME) -> None:
    """Raise :class:`NonFiniteValues` if any float tensor holds NaN or inf (checks exponent bits)."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for key, info in tensors.items():
            if info.dtype not in FLOAT_DTYPES or info.end == info.start:
                continue
            _, mask, view = FLOAT_DTYPES[info.dtype]
            bits = mm[info.start:info.end].view(view)
            bad = np.count_nonzero((bits & np.array(mask, dtype=view)) == np.array(mask, dtype=view))
            if bad:
                raise NonFiniteValues(f"expected all values finite, found {bad} NaN/inf", file=file, key=key)
    finally:
        del mm


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate_files(
    config_path: str | os.PathLike,
    weights_path: str | os.PathLike,
    base: BaseModelSpec,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    config_name: str = CONFIG_NAME,
    weights_name: str = WEIGHTS_NAME,
) -> AdapterManifest:
    """Validate an adapter given as two files; return its manifest or raise an :class:`AdapterError`.

    ``config_name`` / ``weights_name`` are the names shown in messages (e.g. the uploaded file names);
    the paths are never derived from them.
    """
    pairs = ((config_path, config_name), (weights_path, weights_name))
    for path, name in pairs:
        refuse_pickle(path, name)
    for path, name in pairs:
        if not os.path.isfile(path):
            raise AdapterFileMissing("expected a file, found none", file=name)
    csize = os.path.getsize(config_path)
    if csize > MAX_CONFIG_BYTES:
        raise AdapterTooLarge(f"expected at most {MAX_CONFIG_BYTES} bytes, found {csize}", file=config_name)
    wsize = os.path.getsize(weights_path)
    if wsize > max_bytes:
        raise AdapterTooLarge(f"expected at most {max_bytes} bytes, found {wsize}", file=weights_name)
    with open(config_path, "rb") as fh:
        config = FlyLoRAConfig.from_json_bytes(fh.read(), file=config_name)
    tensors = read_header(weights_path, weights_name)
    modules = validate_tensors(config, tensors, base, file=weights_name)
    check_finite(weights_path, tensors, file=weights_name)
    return AdapterManifest(config=config, modules=modules, tensors=tensors, weights_bytes=wsize,
                           sha256=sha256_file(weights_path))


def validate_dir(adapter_dir: str | os.PathLike, base: BaseModelSpec, *, max_bytes: int = DEFAULT_MAX_BYTES
                 ) -> AdapterManifest:
    """Validate a PEFT-layout directory. Pickle weights (``adapter_model.bin``) are refused unopened."""
    adapter_dir = os.fspath(adapter_dir)
    for suffix in PICKLE_SUFFIXES:
        pickled = os.path.join(adapter_dir, "adapter_model" + suffix)
        if os.path.exists(pickled) and not os.path.exists(os.path.join(adapter_dir, WEIGHTS_NAME)):
            refuse_pickle(pickled)
    return validate_files(os.path.join(adapter_dir, CONFIG_NAME), os.path.join(adapter_dir, WEIGHTS_NAME), base,
                          max_bytes=max_bytes)
