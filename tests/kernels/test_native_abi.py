"""The compiled CPU kernel's ABI check: ``native`` loads a library only when the library's own report
(``flylora_cpu_abi``: version, MAX_R, sizeof(SlotArgs), dtype codes) matches what ``native`` declares, and
otherwise falls back to torch as it does when the library cannot be built."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import pytest
import torch

from flylora_runtime.kernels import apply_reference, build_slots, native
from flylora_runtime.kernels.cpu import apply_cpu
from flylora_runtime.reference.ops import LayerAdapter
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason="the compiled CPU kernel is unavailable here (no C compiler?)")


class _WiderSlotArgs(native._SlotArgs):
    """A ``SlotArgs`` mirror with one field more than the C struct has."""

    _fields_ = [("extra", ctypes.c_int64)]


#: One way each for native.py's declarations to disagree with the library: (attribute, value, ABI key).
MISMATCHES = {
    "version": ("ABI_VERSION", native.ABI_VERSION + 1, "version"),
    "max_rank": ("MAX_RANK", 32, "max_rank"),
    "slot_args": ("_SlotArgs", _WiderSlotArgs, "slot_args_bytes"),
    "dtype_codes": ("DTYPE_CODES", {torch.float32: 0, torch.bfloat16: 2, torch.float16: 1}, "dtype_bf16"),
}


@pytest.fixture
def reload_native(monkeypatch):
    """Forget the loaded library, so that the next ``native.library()`` loads (the cached build) again."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)


def test_the_built_library_reports_the_expected_abi() -> None:
    lib = native.library()
    assert native.library_abi(lib) == native.expected_abi()
    assert native.expected_abi()["slot_args_bytes"] == 19 * 8  # every SlotArgs field is 8 bytes
    native.check_abi(lib)  # does not raise


def test_the_benchmark_only_entry_point_is_not_exported() -> None:
    lib = native.library()
    assert hasattr(lib, "flylora_cpu_apply_slots") and hasattr(lib, "flylora_cpu_pack_rows")
    assert not hasattr(lib, "flylora_cpu_apply")  # the 28-argument call is internal to the C source


@pytest.mark.parametrize("name", MISMATCHES)
def test_check_abi_names_each_difference(monkeypatch, name: str) -> None:
    attr, value, key = MISMATCHES[name]
    monkeypatch.setattr(native, attr, value)
    with pytest.raises(native.AbiMismatch, match=rf"{key} \d+ \(expected \d+\)"):
        native.check_abi(native.library())


def test_a_library_without_an_abi_report_is_refused() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    with pytest.raises(native.AbiMismatch, match="does not export flylora_cpu_abi"):
        native.check_abi(libc)


@pytest.mark.parametrize("name", MISMATCHES)
def test_a_mismatching_library_is_not_loaded_and_torch_serves(reload_native, monkeypatch, caplog, name) -> None:
    attr, value, key = MISMATCHES[name]
    monkeypatch.setattr(native, attr, value)
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
    assert "compiled CPU kernel is unavailable" in caplog.text and key in caplog.text
    g = torch.Generator().manual_seed(0)
    adapter = [LayerAdapter(A=torch.randn(8, 64, generator=g), B=torch.randn(32, 8, generator=g),
                            d=torch.randn(8, generator=g), top_k=2, scaling=2.0)]
    slots = build_slots([adapter])
    x, ts = torch.randn(3, 64, generator=g), torch.tensor([0, -1, 0])
    got, want = torch.zeros(3, 32), torch.zeros(3, 32)
    apply_cpu(got, x, ts, slots)  # the torch path serves the call
    apply_reference(want, x, ts, slots)
    assert_close(got, want, torch.float32)
    with pytest.raises(RuntimeError, match="unavailable"):
        apply_cpu(got, x, ts, slots, path="native")


def test_the_matching_library_loads_again(reload_native) -> None:
    assert native.library() is not None
