"""Validate a FlyLoRA / PEFT LoRA checkpoint against a base model, without torch and without unpickling.

This is the gate every adapter passes before it is stored or served. It reads the safetensors header within
a bound derived from the base model (:mod:`.header`), checks every key, dtype and shape against the base
model and the config (and, when given, the engine's max rank), then reads the file once in fixed-size chunks
to check that all values are finite (raw IEEE bits) and to hash it. Memory stays bounded whatever the file
holds. Nothing here imports torch, so the gateway can run it (off its event loop) on an upload.

Expected tensors, for every targeted module ``M`` (e.g. ``model.layers.0.self_attn.q_proj``)::

    base_model.model.M.lora_A.weight      [r, in]
    base_model.model.M.lora_B.weight      [out, r]
    base_model.model.M.lora_topk_bias     [r]        (FlyLoRA only; absent in plain PEFT LoRA)
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from flylora_runtime.format.config import FlyLoRAConfig
from flylora_runtime.format.errors import (
    AdapterFileMissing,
    AdapterTooLarge,
    DtypeNotAllowed,
    EngineLimitExceeded,
    MissingTensor,
    NonFiniteValues,
    ShapeMismatch,
    UnexpectedTensor,
    UnknownTargetModule,
    UnsafeFormat,
)
from flylora_runtime.format.header import TensorInfo, read_header
from flylora_runtime.format.modelspec import BaseModelSpec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: A file the gateway writes into an adapter's folder before deleting it: the engine's resolver then refuses
#: the adapter (its folder is only removed once every engine has let go of it).
TOMBSTONE_NAME = "DELETED"
KEY_PREFIX = "base_model.model."

#: Default size limit for one weights file: the authors' Llama-3.1-8B adapter is ~336 MB.
DEFAULT_MAX_BYTES = 1 << 30
#: A PEFT adapter_config.json is ~1 KB; 64 KiB bounds what parsing an uploaded one can cost.
MAX_CONFIG_BYTES = 64 * 1024
#: Tensors beyond what a valid adapter can hold that are still read (so that a few stray tensors are reported by
#: name, e.g. "unexpected tensor ...", instead of "too many tensors").
EXTRA_TENSORS_READ = 64
#: Bytes read at a time when checking values and hashing (bounds the memory of a check).
READ_CHUNK_BYTES = 4 << 20

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

#: safetensors dtype -> (bytes per element, exponent mask for the non-finite test, unsigned view dtype)
FLOAT_DTYPES: dict[str, tuple[int, int, str]] = {
    "F16": (2, 0x7C00, "<u2"),
    "BF16": (2, 0x7F80, "<u2"),
    "F32": (4, 0x7F800000, "<u4"),
    "F64": (8, 0x7FF0000000000000, "<u8"),
}


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


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file's first 9 bytes are a safetensors length prefix (within the file) and a JSON object's
    opening brace. A pickle (``80 0N`` then opcodes) or a zip (``PK``) never has ``{`` at byte 8."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (hlen,) = struct.unpack("<Q", head[:8])
    return 8 + hlen <= size


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
            head = fh.read(9)
        size = os.path.getsize(path)
    except FileNotFoundError:
        return
    if looks_like_safetensors(head, size):
        return  # a safetensors header length may well start with 0x80 0x02..0x05 (640 bytes is 80 02 00 ...)
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head[:4] == b"PK\x03\x04":
        raise UnsafeFormat(
            "the file is a pickle or a torch.save archive, not safetensors; it is refused and never opened",
            file=name)


def expected_modules(config: FlyLoRAConfig, base: BaseModelSpec, *, file: str = CONFIG_NAME) -> tuple[str, ...]:
    """Module paths the config targets on ``base``; :class:`UnknownTargetModule` for unknown names."""
    for t in config.target_modules:
        if t not in base.shapes:
            raise UnknownTargetModule(
                f"expected target modules among {sorted(base.shapes)} of {base.name}, found {t!r}",
                file=file, key="target_modules")
    if config.layers is None:
        layer_list = list(range(base.num_layers))
    else:
        layer_list = list(config.layers)
        bad = [x for x in layer_list if not 0 <= x < base.num_layers]
        if bad:
            raise UnknownTargetModule(f"expected layer indices in [0, {base.num_layers}), found {bad[:8]}",
                                      file=file, key="layers_to_transform")
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


def check_values_and_hash(path: str | os.PathLike, tensors: dict[str, TensorInfo], *, file: str = WEIGHTS_NAME,
                          hash_file: bool = True) -> str | None:
    """One pass over the file in :data:`READ_CHUNK_BYTES` chunks: raise :class:`NonFiniteValues` if any float
    tensor holds NaN or inf (exponent bits all set), and return the file's SHA-256 (None if not asked).

    ``tensors`` must cover the data section back to back in file order (as :func:`.header.read_header`
    returns them). Memory: one chunk buffer and numpy temporaries of the same size.
    """
    h = hashlib.sha256() if hash_file else None
    buf = bytearray(READ_CHUNK_BYTES)
    view = memoryview(buf)

    def read(count: int, itemsize: int = 1) -> Iterator[int]:
        """Read ``count`` bytes into ``buf`` a chunk at a time (hashing them); yield each chunk's length."""
        step = READ_CHUNK_BYTES - READ_CHUNK_BYTES % itemsize  # whole elements: a value is never split
        while count:
            n = fh.readinto(view[:min(step, count)])
            if not n:
                raise NonFiniteValues("expected more bytes, found the end of the file", file=file)
            count -= n
            if h is not None:
                h.update(view[:n])
            yield n

    with open(path, "rb") as fh:
        pos = 0
        for key, info in sorted(tensors.items(), key=lambda item: item[1].start):
            if info.start > pos:  # the header (and any gap) only feeds the hash
                if h is None:
                    fh.seek(info.start)
                else:
                    fh.seek(pos)
                    for _ in read(info.start - pos):
                        pass
            spec = FLOAT_DTYPES.get(info.dtype)
            bad = 0
            for n in read(info.end - info.start, spec[0] if spec else 1):
                if spec is not None:
                    mask = np.array(spec[1], dtype=spec[2])
                    bits = np.frombuffer(buf, dtype=spec[2], count=n // spec[0])
                    bad += int(np.count_nonzero((bits & mask) == mask))
                    del bits
            if bad:
                raise NonFiniteValues(f"expected all values finite, found {bad} NaN/inf", file=file, key=key)
            pos = info.end
        if h is not None:
            fh.seek(pos)
            for chunk in iter(lambda: fh.read(READ_CHUNK_BYTES), b""):
                h.update(chunk)
    return h.hexdigest() if h is not None else None


def check_finite(path: str | os.PathLike, tensors: dict[str, TensorInfo], *, file: str = WEIGHTS_NAME) -> None:
    """Raise :class:`NonFiniteValues` if any float tensor holds NaN or inf."""
    check_values_and_hash(path, tensors, file=file, hash_file=False)


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
    max_rank: int | None = None,
    hash_file: bool = True,
    check_values: bool = True,
) -> AdapterManifest:
    """Validate an adapter given as two files; return its manifest or raise an :class:`AdapterError`.

    ``config_name`` / ``weights_name`` are the names shown in messages (e.g. the uploaded file names);
    the paths are never derived from them. ``max_rank``: the serving engine's largest rank
    (:class:`EngineLimitExceeded` above it). ``hash_file=False`` skips the SHA-256 (``sha256`` is then "");
    ``check_values=False`` (with it) reads no tensor data at all: the structure only.
    Cheap checks come first: sizes, the config, the header's length and structure; the file's bytes are
    read only for an adapter that passed them.
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
        config = FlyLoRAConfig.from_json_bytes(fh.read(MAX_CONFIG_BYTES + 1), file=config_name)
    if max_rank is not None and config.r > max_rank:
        raise EngineLimitExceeded(f"expected r <= {max_rank} (the engine's max LoRA rank), found r = {config.r}",
                                  file=config_name, key="r")
    expected_modules(config, base, file=config_name)
    tensors = read_header(weights_path, weights_name, max_tensors=base.max_adapter_tensors() + EXTRA_TENSORS_READ)
    modules = validate_tensors(config, tensors, base, file=weights_name)
    digest = (check_values_and_hash(weights_path, tensors, file=weights_name, hash_file=hash_file)
              if check_values or hash_file else None)
    return AdapterManifest(config=config, modules=modules, tensors=tensors, weights_bytes=wsize,
                           sha256=digest or "")


def validate_dir(adapter_dir: str | os.PathLike, base: BaseModelSpec, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_rank: int | None = None, hash_file: bool = True, check_values: bool = True) -> AdapterManifest:
    """Validate a PEFT-layout directory. Pickle weights (``adapter_model.bin``) are refused unopened."""
    adapter_dir = os.fspath(adapter_dir)
    for suffix in PICKLE_SUFFIXES:
        pickled = os.path.join(adapter_dir, "adapter_model" + suffix)
        if os.path.exists(pickled) and not os.path.exists(os.path.join(adapter_dir, WEIGHTS_NAME)):
            refuse_pickle(pickled)
    return validate_files(os.path.join(adapter_dir, CONFIG_NAME), os.path.join(adapter_dir, WEIGHTS_NAME), base,
                          max_bytes=max_bytes, max_rank=max_rank, hash_file=hash_file, check_values=check_values)
