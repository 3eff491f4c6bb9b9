"""Which entries of a sparse A are kept, and how they are packed: one home for the adapter's compact form
(:mod:`.compact`) and the kernels' slot layout (:mod:`flylora_runtime.kernels.lifecycle`).

"Nonzero" is decided on the raw bits (:func:`nonzero_bits`), so ``-0.0`` counts as an entry and every
packing round-trips bit for bit. Torch only: no file formats, no kernels.
"""

from __future__ import annotations

import torch

#: Integer dtype of the same width, to look at a float tensor's raw bits (``A.view(BITS_VIEW[A.dtype])``).
BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


def nonzero_bits(A: torch.Tensor) -> torch.Tensor:
    """``bool`` mask of ``A``'s entries whose raw bits are not all zero (``-0.0`` is an entry, ``+0.0`` not)."""
    return A.contiguous().view(BITS_VIEW[A.dtype]) != 0


def compact_rows(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise compaction of ``A [r, in]``: ``(idx [r, P] int64, val [r, P], nnz [r] int64)``.

    Row ``i``'s nonzero columns (decided on the raw bits, so ``-0.0`` is kept) in ascending order, padded
    with column 0 and value 0.0; ``P`` is the largest row count.
    """
    A = A.contiguous()
    nonzero = nonzero_bits(A)
    nnz = nonzero.sum(dim=1)
    p = int(nnz.max().item()) if A.shape[0] else 0
    if A.shape[0] and int(nnz.min().item()) == p:  # every row equally full (the authors' A): no sort needed,
        idx = nonzero.nonzero()[:, 1].view(A.shape[0], p)  # nonzero() lists positions row by row, in order
        return idx, torch.gather(A, 1, idx), nnz
    # Stable sort puts nonzero columns first, in ascending column order.
    order = torch.sort((~nonzero).to(torch.int8), dim=1, stable=True).indices[:, :p]
    real = torch.arange(p, device=A.device).unsqueeze(0) < nnz.unsqueeze(1)
    idx = torch.where(real, order, torch.zeros_like(order))
    val = torch.where(real, torch.gather(A, 1, order), torch.zeros((), dtype=A.dtype, device=A.device))
    return idx, val, nnz


def column_words(A: torch.Tensor) -> torch.Tensor:
    """``[r, ceil(in/16)]`` int16 bitmasks of the entries :func:`compact_rows` keeps: bit ``c`` of word ``w``
    of row ``j`` is set when row ``j`` has an entry at column ``16*w + c`` (the 16 bits read as unsigned)."""
    r, n_in = A.shape
    words = (n_in + 15) // 16
    bits = torch.zeros(r, words * 16, dtype=torch.int32)
    bits[:, :n_in] = nonzero_bits(A).to(torch.int32)
    w = (bits.view(r, words, 16) << torch.arange(16, dtype=torch.int32)).sum(-1)
    return torch.where(w >= 32768, w - 65536, w).to(torch.int16)  # the same 16 bits, as int16
