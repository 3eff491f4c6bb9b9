"""Read a safetensors header within a fixed memory bound, whatever the file holds.

The header is the only untrusted structure that is parsed (the tensor data is only ever read as raw bits).
A hostile file can make a JSON parser build millions of objects (about 24x the header's size in Python
objects), nest arrays until the parser recurses out of stack, or carry integers of millions of digits.
Three steps keep that bounded:

1. **A small cap, known before anything is read.** The 8-byte length prefix is checked against
   :func:`header_limit` (``HEADER_BYTES_PER_TENSOR`` x the tensors a valid adapter of the base model can have,
   plus ``HEADER_METADATA_BYTES``), never against safetensors' own 100 MB. The validator allows 64 stray
   tensors on top (so they are named in its error); for the demo model (30 layers, 7 projections, 3 tensors
   each) that is 238 KiB, for Llama-3.1-8B 248 KiB.
2. **A typed parse, no Python objects.** The ``safetensors`` library (Rust, serde) parses the header straight
   into its typed structure: a tensor entry must be ``{dtype, shape: [uint], data_offsets: [uint, uint]}``,
   ``__metadata__`` a map of strings. Anything else (a boolean where a list belongs, nesting, a 5,000-digit
   number, duplicate fields, invalid UTF-8, trailing bytes) is refused by the parser with its position. The
   library also checks that the tensors cover the data section exactly, back to back, and that each
   tensor's byte length matches its shape and dtype.
3. **Structure checks early.** The number of tensors is checked against the same bound before anything
   else is looked at, and offsets are derived from the library's validated layout (tensors in offset order,
   each ``numel x itemsize`` bytes), so no second JSON parse happens.

Peak memory of a header read is therefore a small multiple of :func:`header_limit` (measured by the
gateway's upload test, see docs/SECURITY.md). Nothing here imports torch, and nothing is unpickled.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

from safetensors import safe_open

from flylora_runtime.format.errors import DtypeNotAllowed, InvalidSafetensors

#: Bytes one tensor entry may take in a header. A real entry is ~150 bytes:
#: ``"base_model.model.model.layers.125.self_attn.q_proj.lora_topk_bias":{"dtype":"BF16","shape":[14336,128],``
#: ``"data_offsets":[1234567890,1234567890]},`` plus whatever spacing the writer used.
HEADER_BYTES_PER_TENSOR = 256
#: Room for ``__metadata__`` (PEFT writes ``{"format": "pt"}``) and the alignment padding writers add.
HEADER_METADATA_BYTES = 64 * 1024
#: Tensors per adapted module in the authors' format: lora_A, lora_B, lora_topk_bias.
TENSORS_PER_MODULE = 3
#: Cap used when no base model is known (64 layers x 7 projections).
DEFAULT_MAX_TENSORS = 64 * 7 * TENSORS_PER_MODULE
#: A message from the parser is cut to this length (it can quote a key of the file).
MAX_MESSAGE_CHARS = 300

#: Bytes per element of every dtype the safetensors format names (sub-byte float types are refused).
ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def header_limit(max_tensors: int) -> int:
    """The largest header accepted for a file of at most ``max_tensors`` tensors."""
    return HEADER_BYTES_PER_TENSOR * max(1, max_tensors) + HEADER_METADATA_BYTES


def _short(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def read_header(path: str | os.PathLike, display: str | None = None, *,
                max_tensors: int = DEFAULT_MAX_TENSORS) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, in offset order; :class:`InvalidSafetensors` for anything else.

    Bounded: a header longer than ``header_limit(max_tensors)`` is refused from its 8-byte length alone.
    """
    name = display or os.path.basename(os.fspath(path))
    size = os.path.getsize(path)
    limit = header_limit(max_tensors)
    with open(path, "rb") as fh:
        prefix = fh.read(9)
    if len(prefix) < 8:
        raise InvalidSafetensors(f"expected an 8-byte header length, found a {size}-byte file", file=name)
    (hlen,) = struct.unpack("<Q", prefix[:8])
    if 8 + hlen > size:
        raise InvalidSafetensors(f"expected a header length within the file ({size} bytes), found {hlen}", file=name)
    if hlen > limit:
        raise InvalidSafetensors(
            f"expected a header of at most {limit} bytes (an adapter has at most {max_tensors} tensors), "
            f"found {hlen}", file=name)
    if prefix[8:9] != b"{":
        raise InvalidSafetensors("expected the header to be a JSON object", file=name)
    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            keys = f.offset_keys()
            if len(keys) > max_tensors:
                raise InvalidSafetensors(f"expected at most {max_tensors} tensors, found {len(keys)}", file=name)
            layout = [(k, f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in keys]
    except InvalidSafetensors:
        raise
    except Exception as exc:  # the library's SafetensorError (and anything else it raises) is a bad file
        raise InvalidSafetensors(f"expected a well-formed safetensors file: {_short(str(exc))}", file=name) from None
    out: dict[str, TensorInfo] = {}
    offset = 8 + hlen
    for key, dtype, shape in layout:
        itemsize = ITEMSIZE.get(dtype)
        if itemsize is None:
            raise DtypeNotAllowed(f"expected a byte-sized dtype, found {dtype}", file=name, key=_short(key))
        nbytes = math.prod(shape) * itemsize
        out[key] = TensorInfo(dtype=dtype, shape=shape, start=offset, end=offset + nbytes)
        offset += nbytes
    if offset != size:  # the library checks this too; offsets below depend on it
        raise InvalidSafetensors(f"expected the tensors to end at the end of the file, found {size - offset} "
                                 "bytes more", file=name)
    return out
