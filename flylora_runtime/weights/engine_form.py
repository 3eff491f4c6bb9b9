"""Reading an adapter's engine form (its file and its writer: :mod:`flylora_runtime.format.engine_form`)."""

from __future__ import annotations

import logging
import os
import struct
from collections import OrderedDict

import torch

from flylora_runtime.format.checkpoint import WEIGHTS_NAME
from flylora_runtime.format.engine_form import (_ALIGN, _ITEMSIZE, B_KEY, FORMAT_TAG, ENGINE_FORM_NAME, _engine_key,
                                                _header, _header_bytes)
from flylora_runtime.format.header import header_limit

logger = logging.getLogger("flylora.engine_form")


class FormTensors(dict):
    """The tensors :func:`read_engine_form` returns (a dict by checkpoint name), and where they live: ``mapping``,
    the whole file as a uint8 tensor (every tensor is a view of it), and ``layout``, the checked layout of its
    headers, one object for every file of the same layout while it is cached (what
    :class:`~flylora_runtime.kernels.adapter_template.AdapterTemplate` s are keyed by)."""

    mapping: torch.Tensor
    layout: tuple


def read_engine_form(lora_dir: str, max_tensors: int = 64 * 7 * 3 * 4) -> tuple[FormTensors, float] | None:
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


#: What :func:`_layout` made of a pair of headers, by (the form's header bytes, the checkpoint's header bytes,
#: both files' sizes): every adapter of one shape has the same two headers, so a cold load of the next one
#: skips two JSON parses and the walk over its 630 entries (~2-3 ms of a load in the engine loop here).
#: The layout depends on nothing else; each file's values are still checked. Bounded (oldest dropped).
_LAYOUTS: OrderedDict = OrderedDict()
_MAX_LAYOUTS = 16


def _read(path: str, weights: str, st: os.stat_result, ws: os.stat_result, max_tensors: int) -> dict:
    if st.st_mtime_ns < ws.st_mtime_ns:
        raise ValueError("older than the checkpoint")
    if st.st_size < 8:
        raise ValueError("too short")
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=st.st_size)
    data = torch.empty(0, dtype=torch.uint8).set_(storage)
    form_head = _header_bytes(memoryview(data.numpy()), st.st_size, max_tensors)
    with open(weights, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("checkpoint too short")
        (hlen,) = struct.unpack("<Q", head)
        source_head = head + fh.read(min(hlen, header_limit(max_tensors)))
    key = (form_head, source_head, st.st_size, ws.st_size)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _layout(form_head, source_head, st.st_size, ws.st_size, max_tensors)
        _LAYOUTS[key] = layout
        while len(_LAYOUTS) > _MAX_LAYOUTS:
            _LAYOUTS.popitem(last=False)
    scaling, runs = layout
    out = FormTensors()
    out.mapping, out.layout = data, layout
    for torch_dtype, lo, hi, tensors in runs:
        span = data[lo:hi].view(torch_dtype)
        lo_hi = torch.aminmax(span)  # one pass per run: a NaN or an inf reaches the min or the max
        if not bool(torch.isfinite(lo_hi.min) & torch.isfinite(lo_hi.max)):
            raise ValueError("non-finite values")
        for (key, shape, _), t in zip(tensors, torch.split(span, [c for _, _, c in tensors])):
            t = t.view(shape)
            out[key] = t.T if key.endswith(B_KEY) else t
    return out, scaling


def _layout(form_head: bytes, source_head: bytes, size: int, source_size: int, max_tensors: int) -> tuple:
    """``(scaling, runs)`` of an engine form whose header is ``form_head`` made from a checkpoint whose header is
    ``source_head`` (files of ``size`` and ``source_size`` bytes): every check of the module docstring that
    the headers decide; raises ``ValueError`` on any. ``runs``: per run of one dtype, ``(dtype, first byte,
    end byte, [(key, shape, count)])``, in file order."""
    dtypes = {"BF16": torch.bfloat16, "F32": torch.float32}
    header, start = _header(form_head, size, max_tensors)
    meta = header.pop("__metadata__", None) or {}
    if start % _ALIGN or meta.get("format") != FORMAT_TAG or meta.get("source_bytes") != str(source_size):
        raise ValueError(f"format {meta.get('format')!r}, {meta.get('source_bytes')} source bytes")
    scaling = float(meta["scaling"])
    source_header, _ = _header(source_head, source_size, max_tensors)
    source_header.pop("__metadata__", None)
    source = {k: tuple(v["shape"]) for k, v in source_header.items()}
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
    if start + end != size:
        raise ValueError("trailing bytes")
    return scaling, tuple((d, lo, hi, tuple(t)) for d, lo, hi, t in runs)
