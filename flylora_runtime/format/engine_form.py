"""The engine form of an adapter (this module: its file and its writer, numpy only; the reader is
:mod:`flylora_runtime.weights.engine_form`): its tensors already in a bf16 engine's layout, written once at upload.

A bf16 engine that loads an adapter from its validated fp32 checkpoint reads the whole file, converts every
tensor to bf16, folds ``lora_alpha / r`` into ``B`` and copies each ``B`` transposed into its slots, inside
the engine loop: most of a cold adapter's ~0.1 s on the 2-vCPU machine of docs/BENCHMARKS.md. The gateway
does that work once, when the adapter is uploaded, and stores the result beside the checkpoint
(:data:`ENGINE_FORM_NAME`)::

    base_model.model.M.lora_A.weight      [r, in]   bf16   A.to(bfloat16), as vLLM converts it
    base_model.model.M.lora_B_T.weight    [r, out]  bf16   (B.to(bfloat16) * scaling).T, contiguous: vLLM's
                                                           in-place scaling (fp32 arithmetic, rounded to bf16)
    base_model.model.M.lora_topk_bias     [r]       fp32   unchanged (FlyLoRA only)

with ``scaling`` (``lora_alpha / r``) in the file's metadata. The engine
(:func:`flylora_runtime.weights.engine_form.read_engine_form`, from
:func:`flylora_runtime.vllm_plugin.loading.read_checkpoint`) maps the file (privately; nothing writes to it),
checks it, and hands vLLM views of it: ``A`` as it is, ``B`` as the transposed view of ``B^T``, with vLLM's
scaling marked as already applied. The values the engine serves are bit for bit those of the checkpoint's
path; the load reads nothing it does not use and writes nothing, and the slot write copies ``B^T``
contiguously instead of transposing it.

The file is an optimisation, never a second source of truth: the engine uses it only when its LoRA dtype is
bf16, vLLM's scaling for the adapter is the one in the file, and :func:`read_engine_form` accepts it (the
format tag, the checkpoint's size recorded in it, a modification time no older than the checkpoint's, exactly
the checkpoint's tensors with the expected dtypes and shapes, every value finite). Anything else, it loads the
checkpoint as before. A tenant never
supplies this file: the gateway writes it from the checkpoint it has validated. Memory while writing: one
tensor at a time (:func:`write_engine_form` streams the file).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from flylora_runtime.format.header import TensorInfo, header_limit, read_header
from flylora_runtime.weights.files import atomic_write


ENGINE_FORM_NAME = "flylora_engine.bf16.safetensors"
FORMAT_TAG = "flylora-engine-bf16/1"
B_KEY, BT_KEY = ".lora_B.weight", ".lora_B_T.weight"
_ITEMSIZE = {"BF16": 2, "F32": 4}
_ALIGN = 8
_SOURCE = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}


def _engine_key(key: str) -> str:
    return key[: -len(B_KEY)] + BT_KEY if key.endswith(B_KEY) else key


def _as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A checkpoint tensor's values as fp32, as torch's ``.to(torch.float32)`` gives them."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)  # exact from F16; from F64 rounded to nearest even, as torch does


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 values rounded to bf16 (nearest, ties to even: torch's ``.to(torch.bfloat16)`` for finite
    values), as their 16-bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _engine_bytes(key: str, info: TensorInfo, fh, scaling: float) -> np.ndarray:
    fh.seek(info.start)
    count = int(np.prod(info.shape)) if info.shape else 1
    raw = np.fromfile(fh, dtype=_SOURCE[info.dtype], count=count).reshape(info.shape)
    if key.endswith("_bias"):
        return _as_float32(raw, info.dtype)  # the routing bias, read as fp32 by the engine
    bits = raw if info.dtype == "BF16" else _bfloat16_bits(_as_float32(raw, info.dtype))
    if key.endswith(B_KEY) and scaling != 1.0:  # vLLM: lora_b *= scaling on the bf16 B (skipped when 1)
        bits = _bfloat16_bits(_as_float32(bits, "BF16") * np.float32(scaling))
    if bool(((bits & np.uint16(0x7F80)) == np.uint16(0x7F80)).any()):  # beyond bf16's range: inf
        raise ValueError(f"{key} is not finite in bfloat16")
    return np.ascontiguousarray(bits.T) if key.endswith(B_KEY) else bits


def write_engine_form(weights_path: str | os.PathLike, out_path: str | os.PathLike, scaling: float) -> int:
    """Write the engine form of the (validated) checkpoint ``weights_path``, whose config scales by
    ``scaling`` (``lora_alpha / r``), to ``out_path`` (atomically, one tensor in memory at a time; numpy only,
    so the gateway runs it without torch); return its size in bytes. ``ValueError`` (and no file) when a
    value is not finite in bf16 (beyond bf16's range)."""
    weights_path, out_path, scaling = os.fspath(weights_path), os.fspath(out_path), float(scaling)
    source = read_header(weights_path)
    if any(info.dtype not in _SOURCE for info in source.values()):
        raise ValueError("the checkpoint holds a dtype other than F16, BF16, F32 and F64")
    entries, offset = {}, 0
    # fp32 first, then bf16: every tensor starts aligned to its element size.
    order = sorted(source, key=lambda k: (not k.endswith("_bias"), k))
    for key in order:
        info = source[key]
        dtype = "F32" if key.endswith("_bias") else "BF16"
        shape = list(info.shape[::-1]) if key.endswith(B_KEY) else list(info.shape)
        nbytes = _ITEMSIZE[dtype] * int(np.prod(shape))
        entries[_engine_key(key)] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = dict(entries, __metadata__={"format": FORMAT_TAG, "source_bytes": str(os.path.getsize(weights_path)),
                                         "scaling": repr(scaling)})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out, open(weights_path, "rb") as src:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for key in order:
                out.write(memoryview(_engine_bytes(key, source[key], src, scaling)))

    atomic_write(out_path, write)
    return 8 + len(raw) + offset


def _header_bytes(raw: bytes | memoryview, size: int, max_tensors: int) -> bytes:
    """A safetensors file's length prefix and header, as bytes, from the start of a file of ``size`` bytes;
    ``ValueError`` when the length is past the file or the cap for ``max_tensors`` tensors."""
    (hlen,) = struct.unpack("<Q", bytes(raw[:8]))
    if hlen > header_limit(max_tensors) or 8 + hlen > size:
        raise ValueError(f"header length {hlen}")
    return bytes(raw[:8 + hlen])


def _header(raw: bytes | memoryview, size: int, max_tensors: int) -> tuple[dict, int]:
    """A safetensors header (the tensor entries and ``__metadata__``) and where the data starts."""
    head = _header_bytes(raw, size, max_tensors)
    header = json.loads(head[8:])
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    return header, len(head)
