"""The one check every backend goes through: ``flylora_apply`` against the reference oracle."""

from __future__ import annotations

import torch

from flylora_runtime.kernels import FlyLoRASlots, check_inputs, flylora_apply
from flylora_runtime.kernels.cpu import apply_cpu
from tests.helpers import assert_close

from tests.kernels.cases import Case, build, expected


#: Backend names for tests: those of ``flylora_apply`` plus the CPU backend forced onto one of its paths.
CPU_PATHS = ("cpu-native", "cpu-small", "cpu-grouped")


def run_backend(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slots: FlyLoRASlots,
                backend: str) -> None:
    """``flylora_apply`` with ``backend``; ``"cpu-native"``/``"cpu-small"``/``"cpu-grouped"`` force that
    CPU path (``cpu-native`` skips, saying why, when no compiled kernel can be built here)."""
    if backend == "cpu-native":
        from flylora_runtime.kernels import native
        if native.library() is None:
            import pytest
            pytest.skip("the compiled CPU kernel is unavailable here (no C compiler, or FLYLORA_CPU_NATIVE=0)")
    if backend in CPU_PATHS:
        check_inputs(out, x, token_slot, slots, check_indices=True)
        apply_cpu(out, x, token_slot, slots, path=backend.removeprefix("cpu-"))
    else:
        flylora_apply(out, x, token_slot, slots, backend=backend)


def check_case(case: Case, backend: str, device: str = "cpu") -> None:
    adapters, slots, x, token_slot, out0 = build(case, device)
    out = out0.clone()
    run_backend(out, x, token_slot, slots, backend)
    want, keep = expected(adapters, slots, x, token_slot, out0)
    out, out0, none = out.cpu(), out0.cpu(), token_slot.cpu() < 0
    # Rows without an adapter: exactly untouched (bit for bit), whatever the dtype.
    assert torch.equal(out[none], out0[none]), "rows with slot -1 were modified"
    # Near-tie rows (see cases.expected) are rare; if many rows were dropped the check would be empty.
    assert int((~keep).sum()) <= max(1, case.T // 50), f"{int((~keep).sum())} near-tie rows of {case.T}"
    rows = keep & ~none
    assert_close(out[rows], want[rows], case.dtype, msg=f"{backend} {case}")
