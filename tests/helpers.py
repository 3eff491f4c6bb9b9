"""Helpers shared by every test package: one ``assert_close`` with a per-dtype tolerance table."""

from __future__ import annotations

import torch

#: ``{dtype: (rtol, atol)}`` for a kernel result in ``dtype`` against an fp32 reference of values O(1-10).
#:
#: The kernels compute ``y`` and the expand in fp32 and round once into ``out``; the tests' reference
#: mirrors the slots' storage (A, ``scaling * B``), so what is left is that one final rounding plus
#: summation order. Measured on the CPU suite: max relative error = exactly the half-ulp of the dtype.
#:
#: - fp32: summation order over up to ``in = 4096`` products, ~``sqrt(in) * 2^-24`` = 4e-6 relative
#:   (measured max 4e-6); 2e-5 leaves 5x margin.
#: - bf16: one rounding, half-ulp 2^-8 = 3.9e-3 relative (measured max 3.9e-3); rtol = 1 ulp x 2 = 1.6e-2.
#: - fp16: one rounding, half-ulp 2^-11 = 4.9e-4 relative (measured max 4.9e-4); rtol = 1 ulp x 2 = 2e-3.
#: - atol only absorbs sums that cancel to near zero, where the rounding is tiny in absolute terms.
#: A wrongly selected rank, a dropped bias or a wrong scaling moves a value by 0.1-1: far outside all three.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """Assert ``actual`` (computed in ``dtype``) matches ``expected`` (fp32) within ``TOLERANCES[dtype]``.

    Both are compared in fp32; ``dtype`` picks the tolerance, so an fp32 result is held to fp32 bounds.
    """
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)
