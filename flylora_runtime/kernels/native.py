"""The compiled CPU kernel (``flylora_cpu.c``): one C call per layer, built on first use, loaded with ctypes.

Why: at decode a layer call moves little data, so the grouped-torch backend's ~20 torch calls per layer
(each a few microseconds of dispatch, allocation and a fp32 cast) cost more than the arithmetic; with
120 adapted layer calls per forward of a 30-layer model that was most of the FlyLoRA overhead. The C
kernel groups tokens by slot, runs the shrink, top-k and k-row expand for every slice, and rounds into
``out`` once, with no allocation per token, on torch's own OpenMP thread pool (the library links
``libgomp.so.1``, which torch has already loaded, so there is one pool).

Build: ``$CC`` (default ``cc``) ``-O3 -march=native -fopenmp -shared``, about a second, cached under
``<data dir>/cache/kernels`` (``FLYLORA_KERNEL_CACHE`` overrides) by a hash of the source, the flags, the
compiler and the CPU's flags, written atomically (concurrent first uses are safe). No compiler, or a failed
build: :func:`library` returns ``None`` once with a warning and the torch backend serves every call.
``FLYLORA_CPU_NATIVE=0`` turns the compiled kernel off.

ABI: the library exports ``flylora_cpu_apply_slots``, ``flylora_cpu_pack_rows``, ``flylora_cpu_copy_pieces``,
``flylora_cpu_count_many``, ``flylora_cpu_pack_many`` and ``flylora_cpu_abi``. The
last reports the constants this module must agree with (:func:`expected_abi`: the ABI version, ``MAX_R``,
the size of the ``SlotArgs`` struct, the dtype codes); a library that disagrees, or does not report them, is
refused when it is loaded (:class:`AbiMismatch`, the same warning and torch fallback as a failed build).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("flylora_cpu.c")
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
#: What this module expects the library to report (``flylora_cpu_abi``; see :func:`expected_abi`).
ABI_VERSION = 3  # FLYLORA_CPU_ABI_VERSION in the C source
MAX_RANK = 64  # MAX_R in the C source
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # F32, BF16, F16 in the C source

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SLOT_ARGTYPES = [_ptr, _i64, _ptr, _i64, _int, _ptr, _i64, _int, _ptr, _int]  # SlotArgs*, T, x.., out.., token_slot, i64
_PACK_ARGTYPES = [_ptr, _int, _i64, _i64, _i64, _ptr, _int, _ptr, _int, _ptr]  # A, dtype, r, in, p, idx.., val.., mask


def cache_dir() -> Path:
    from flylora_runtime.paths import data_dir
    return Path(os.environ.get("FLYLORA_KERNEL_CACHE") or data_dir() / "cache" / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(CFLAGS), version, _cpu_flags()]).encode())
    target = cache_dir() / f"flylora_cpu_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        proc = subprocess.run([cc, *CFLAGS, "-o", str(built), str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent builder's identical file is simply replaced
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; ``None`` when disabled or unavailable."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("FLYLORA_CPU_NATIVE", "1").lower() in ("0", "false", "no", "off"):
            return None
        cc = os.environ.get("CC") or "cc"
        if shutil.which(cc) is None:
            log.warning("FlyLoRA: no C compiler (%s) found: the CPU kernel runs as grouped torch (slower). "
                        "Install gcc to enable the compiled kernel.", cc)
            return None
        try:
            path = _build(cc)
            lib = ctypes.CDLL(str(path))
            check_abi(lib, path)
            fn = lib.flylora_cpu_apply_slots
            fn.argtypes, fn.restype = _SLOT_ARGTYPES, ctypes.c_int
            fn = lib.flylora_cpu_pack_rows
            fn.argtypes, fn.restype = _PACK_ARGTYPES, _i64
            fn = lib.flylora_cpu_copy_pieces
            fn.argtypes, fn.restype = [_ptr, _i64, _i64], None
            fn = lib.flylora_cpu_count_many
            fn.argtypes, fn.restype = [_ptr, _i64, _ptr], None
            fn = lib.flylora_cpu_pack_many
            fn.argtypes, fn.restype = [_ptr, _i64, _i64], _i64
        except Exception as exc:  # noqa: BLE001 - any build/load failure or ABI mismatch degrades to torch
            log.warning("FlyLoRA: the compiled CPU kernel is unavailable (%s); using grouped torch.", exc)
            return None
        _lib = lib
        return _lib


class AbiMismatch(RuntimeError):
    """The library does not report the ABI this module was written for (a stale or foreign build)."""


#: Keys of ``flylora_cpu_abi(key)``, in key order.
ABI_KEYS = ("version", "max_rank", "slot_args_bytes", "dtype_f32", "dtype_bf16", "dtype_f16")


def expected_abi() -> dict[str, int]:
    """What the library must report: this module's constants and the size of its ``SlotArgs`` mirror."""
    return {"version": ABI_VERSION, "max_rank": MAX_RANK, "slot_args_bytes": ctypes.sizeof(_SlotArgs),
            "dtype_f32": DTYPE_CODES[torch.float32], "dtype_bf16": DTYPE_CODES[torch.bfloat16],
            "dtype_f16": DTYPE_CODES[torch.float16]}


def library_abi(lib: ctypes.CDLL) -> dict[str, int]:
    """What ``lib`` reports through ``flylora_cpu_abi``. Raises :class:`AbiMismatch` when it exports none."""
    try:
        fn = lib.flylora_cpu_abi
    except AttributeError:
        raise AbiMismatch("the library does not export flylora_cpu_abi (built from an older or foreign "
                          "source)") from None
    fn.argtypes, fn.restype = [_int], _i64
    return {name: int(fn(key)) for key, name in enumerate(ABI_KEYS)}


def check_abi(lib: ctypes.CDLL, path: str | os.PathLike = "the library") -> None:
    """Raise :class:`AbiMismatch`, naming every difference, unless ``lib`` reports :func:`expected_abi`."""
    got, want = library_abi(lib), expected_abi()
    diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    if diff:
        raise AbiMismatch(f"{path} reports an ABI this flylora_runtime does not speak: " + ", ".join(
            f"{k} {g} (expected {w})" for k, (g, w) in diff.items()))


def supports(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots) -> bool:
    """Whether :func:`apply_native` can run this call (dtypes, rank, int32 compact indices)."""
    return (out.dtype in DTYPE_CODES and x.dtype in DTYPE_CODES and slots.b.dtype in DTYPE_CODES
            and slots.a_val.dtype in DTYPE_CODES and slots.max_rank <= MAX_RANK
            and token_slot.dtype in (torch.int32, torch.int64)
            and (slots.a_idx is None or slots.a_idx.dtype in (torch.int16, torch.int32)))


def static_args(slots) -> tuple:
    """The slot buffers' part of the call, built once per :class:`FlyLoRASlots` (buffers never move:
    slots change in place)."""
    args = getattr(slots, "_native_args", None)
    if args is None:
        offs = [0]
        for o in slots.output_slices:
            offs.append(offs[-1] + o)
        out_off = torch.tensor(offs, dtype=torch.int64)
        for t in (slots.a_val, slots.b, slots.d, slots.k, slots.r, slots.magnitude, *(
                [] if slots.a_mask is None else [slots.a_mask])):
            assert t.is_contiguous()
        P = 0 if slots.a_idx is None else slots.a_val.shape[-1]
        args = (out_off,  # keeps the offsets tensor alive
                (slots.in_features, slots.num_slices, slots.max_rank, slots.num_slots, P, out_off.data_ptr()),
                (slots.a_val.data_ptr(), DTYPE_CODES[slots.a_val.dtype],
                 None if slots.a_idx is None else slots.a_idx.data_ptr(),
                 0 if slots.a_idx is None else slots.a_idx.element_size(),
                 None if slots.a_nnz is None else slots.a_nnz.data_ptr(), int(slots.a_packed),
                 None if slots.a_mask is None else slots.a_mask.data_ptr(),
                 slots.b.data_ptr(), DTYPE_CODES[slots.b.dtype], slots.d.data_ptr(), slots.k.data_ptr(),
                 slots.r.data_ptr(), slots.magnitude.data_ptr()))
        slots._native_args = args
    return args


class _SlotArgs(ctypes.Structure):
    """``SlotArgs`` of the C source: :func:`static_args` in one struct (every field 8 bytes)."""

    _fields_ = [(name, _i64) for name in ("in_", "n", "R", "S", "P")] + [("out_off", _ptr), ("a_val", _ptr), (
        "a_dt", _i64), ("a_idx", _ptr), ("idx_bytes", _i64), ("a_nnz", _ptr), ("packed", _i64), ("a_mask", _ptr), (
        "b", _ptr), ("b_dt", _i64), ("d", _ptr), ("k", _ptr), ("r", _ptr), ("magnitude", _ptr)]


def slot_args(slots) -> int:
    """Address of the ``SlotArgs`` struct of ``slots`` (:class:`_SlotArgs`, built once, kept on the slots): the
    first argument of ``flylora_cpu_apply_slots``."""
    st = getattr(slots, "_native_struct", None)
    if st is None:
        _, head, tail = static_args(slots)
        st = _SlotArgs(*head, *tail)
        slots._native_struct = st
        slots._native_struct_addr = ctypes.addressof(st)
    return slots._native_struct_addr


def apply_native(lib: ctypes.CDLL, out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots) -> None:
    """Run the compiled kernel (same arguments and semantics as ``flylora_apply``; inputs already
    checked, :func:`supports` true). Ties in top-k: the lower rank index first."""
    if not token_slot.is_contiguous():
        token_slot = token_slot.contiguous()
    rc = lib.flylora_cpu_apply_slots(
        slot_args(slots), x.shape[0], x.data_ptr(), x.stride(0), DTYPE_CODES[x.dtype], out.data_ptr(), out.stride(0),
        DTYPE_CODES[out.dtype], token_slot.data_ptr(), token_slot.dtype == torch.int64)
    if rc != 0:
        raise {-1: MemoryError, -3: ValueError}.get(rc, RuntimeError)(
            f"flylora_cpu_apply_slots returned {rc}" + (
                f": token_slot values must be in [-1, {slots.num_slots})" if rc == -3 else ""))


def copy_pieces(table, slot: int) -> None:
    """Run ``flylora_cpu_copy_pieces``: the rows of ``table`` (an int64 numpy array ``[m, 5]``, built and
    bounds-checked by ``flylora_runtime.kernels.lifecycle._copy_plan``, whose plan also keeps alive every
    tensor it points into) into slot ``slot``."""
    library().flylora_cpu_copy_pieces(table.ctypes.data, table.shape[0], slot)


def count_rows(A: torch.Tensor, index_bytes: int, value_dtype: torch.dtype) -> int:
    """``flylora_cpu_pack_rows``'s count pass: the most entries any row of ``A`` (contiguous ``[r, in]`` on the CPU,
    a dtype of :data:`DTYPE_CODES`) holds. The library must be there."""
    return int(library().flylora_cpu_pack_rows(A.data_ptr(), DTYPE_CODES[A.dtype], A.shape[0], A.shape[1], -1, None,
                                               index_bytes, None, DTYPE_CODES[value_dtype], None))


def pack_rows_at(A: torch.Tensor, p: int, idx: int, index_bytes: int, val: int, value_dtype: torch.dtype,
                 mask: int) -> int:
    """``flylora_cpu_pack_rows``'s fill pass: ``A``'s rows of ``p`` entries (``p`` from :func:`count_rows`) written
    at the addresses ``idx``, ``val`` and ``mask`` (a slot's block, or fresh buffers). Returns ``p`` on success."""
    return int(library().flylora_cpu_pack_rows(A.data_ptr(), DTYPE_CODES[A.dtype], A.shape[0], A.shape[1], p, idx,
                                               index_bytes, val, DTYPE_CODES[value_dtype], mask))


#: Columns of :func:`count_many`'s and :func:`pack_many`'s tables (``flylora_cpu_count_many``, ``_pack_many``).
COUNT_COLUMNS, PACK_COLUMNS = 6, 13


def count_row(A: torch.Tensor, index_bytes: int, value_dtype: torch.dtype) -> tuple[int, ...]:
    """One row of :func:`count_many`'s table: what :func:`count_rows` would be called with."""
    return (A.data_ptr(), DTYPE_CODES[A.dtype], A.shape[0], A.shape[1], index_bytes, DTYPE_CODES[value_dtype])


def count_many(table) -> list[int]:
    """:func:`count_rows` of every row of ``table`` (an int64 numpy array ``[m, 6]`` of :func:`count_row`; every
    ``A`` contiguous on the CPU and alive for the call), in one C call."""
    import numpy as np

    out = np.empty(table.shape[0], dtype=np.int64)
    library().flylora_cpu_count_many(table.ctypes.data, table.shape[0], out.ctypes.data)
    return out.tolist()


def pack_many(table, slot: int) -> int:
    """:func:`pack_rows_at` of every row of ``table`` (an int64 numpy array ``[m, 13]``, built and bounds-checked by
    ``flylora_runtime.kernels.lifecycle``) into slot ``slot``, in one C call. Returns ``m``, or the index of the
    first row that failed."""
    return int(library().flylora_cpu_pack_many(table.ctypes.data, table.shape[0], slot))


def pack_rows(A: torch.Tensor, index_dtype: torch.dtype,
              value_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """One slice's ``A [r, in]`` in the packed compact layout (``flylora_cpu_pack_rows``): column indices and
    values ``[r * p]`` (row ``j`` at ``j * p``), the column words ``[r, ceil(in/16)]`` int16, and ``p`` (the
    densest row's count). Bit for bit what :func:`flylora_runtime.weights.compact.compact_rows` and the slots'
    column words give. ``None`` when the library is unavailable or the dtypes are not covered (the caller
    then uses torch)."""
    lib = library()
    if (lib is None or A.device.type != "cpu" or A.dim() != 2 or A.dtype not in DTYPE_CODES
            or value_dtype not in DTYPE_CODES or index_dtype not in (torch.int16, torch.int32)):
        return None
    A = A.contiguous()
    r, n_in = A.shape
    i_bytes = 2 if index_dtype == torch.int16 else 4
    p = count_rows(A, i_bytes, value_dtype)
    idx = torch.empty(r * p, dtype=index_dtype)
    val = torch.empty(r * p, dtype=value_dtype)
    mask = torch.empty(r, (n_in + 15) // 16, dtype=torch.int16)
    rc = pack_rows_at(A, p, idx.data_ptr(), i_bytes, val.data_ptr(), value_dtype, mask.data_ptr())
    return (idx, val, mask, p) if rc == p else None
