"""Reading an adapter's engine form (its file and its writer: :mod:`flylora_runtime.format.engine_form`)."""

from __future__ import annotations

import logging
import os

import torch

from flylora_runtime.format.checkpoint import WEIGHTS_NAME
from flylora_runtime.format.engine_form import (_ALIGN, _ITEMSIZE, B_KEY, FORMAT_TAG, ENGINE_FORM_NAME, _engine_key,
                                                _header, _source_shapes)

logger = logging.getLogger("flylora.engine_form")


def read_engine_form(lora_dir: str, max_tensors: int = 64 * 7 * 3 * 4) -> tuple[dict, float] | None:
    """The checkpoint's tensors from its engine form, in the checkpoint's names and shapes (``A`` bf16,
    ``B`` a transposed bf16 view with the scaling folded in, the bias fp32), and that scaling; or None when
    the folder has no usable engine form (the reason is logged when there is a file). Checks: the docstring
    of :mod:`flylora_runtime.format.engine_form`.

    The tensors are views of one private mapping of the file: the page cache's pages are used as they are,
    nothing is copied until the slot write. Nothing writes to them (a write would copy the page, not change
    the file), and the store's files are never rewritten in place: the gateway renames whole folders in and
    out.
    """
    path, weights = os.path.join(lora_dir, ENGINE_FORM_NAME), os.path.join(lora_dir, WEIGHTS_NAME)
    try:
        st, ws = os.stat(path), os.stat(weights)
    except OSError:
        return None
    try:
        return _read(path, weights, st, ws, max_tensors)
    except Exception as exc:  # any fault of the file: load the checkpoint instead
        logger.warning("engine form of %s not used (%s: %s); loading its checkpoint", lora_dir,
                       type(exc).__name__, str(exc)[:200])
        return None


def _read(path: str, weights: str, st: os.stat_result, ws: os.stat_result, max_tensors: int) -> dict:
    dtypes = {"BF16": torch.bfloat16, "F32": torch.float32}
    if st.st_mtime_ns < ws.st_mtime_ns:
        raise ValueError("older than the checkpoint")
    if st.st_size < 8:
        raise ValueError("too short")
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=st.st_size)
    data = torch.empty(0, dtype=torch.uint8).set_(storage)
    header, start = _header(memoryview(data.numpy()), st.st_size, max_tensors)
    meta = header.pop("__metadata__", None) or {}
    if start % _ALIGN or meta.get("format") != FORMAT_TAG or meta.get("source_bytes") != str(ws.st_size):
        raise ValueError(f"format {meta.get('format')!r}, {meta.get('source_bytes')} source bytes")
    scaling = float(meta["scaling"])
    source = _source_shapes(weights, ws.st_size, max_tensors)
    if sorted(header) != sorted(_engine_key(k) for k in source):
        raise ValueError("not the checkpoint's tensors")
    # Walk the tensors in file order: each must follow the last, in the dtype and shape of the checkpoint's.
    runs, end = [], 0  # runs of one dtype: [dtype, first byte, last byte, [(key, shape, count)]]
    for key, entry in sorted(((k, header[_engine_key(k)]) for k in source), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = "F32" if key.endswith("_bias") else "BF16"
        shape = source[key][::-1] if key.endswith(B_KEY) else source[key]
        lo, hi = entry["data_offsets"]
        torch_dtype, itemsize = dtypes[dtype], _ITEMSIZE[dtype]
        count = 1
        for s in shape:
            count *= s
        if (entry["dtype"] != dtype or tuple(entry["shape"]) != shape or lo != end or hi - lo != count * itemsize
                or (start + lo) % itemsize):
            raise ValueError(f"{key}: {entry}")
        if not runs or runs[-1][0] != torch_dtype:
            runs.append([torch_dtype, start + lo, start + lo, []])
        runs[-1][2] = start + hi
        runs[-1][3].append((key, shape, count))
        end = hi
    if start + end != st.st_size:
        raise ValueError("trailing bytes")
    out = {}
    for torch_dtype, lo, hi, tensors in runs:
        span = data[lo:hi].view(torch_dtype)
        lo_hi = torch.aminmax(span)  # one pass per run: a NaN or an inf reaches the min or the max
        if not bool(torch.isfinite(lo_hi.min) & torch.isfinite(lo_hi.max)):
            raise ValueError("non-finite values")
        for (key, shape, _), t in zip(tensors, torch.split(span, [c for _, _, c in tensors])):
            t = t.view(shape)
            out[key] = t.T if key.endswith(B_KEY) else t
    return out, scaling
