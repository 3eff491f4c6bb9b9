"""The compact, engine-ready form of an adapter: sparse A as per-row indices and values.

For each module, A ``[r, in]`` is stored as

- ``a_idx``  ``[r, P]`` int16 (int32 when ``in > 32767``): column indices of row ``i``'s nonzeros,
  ascending, padded with 0;
- ``a_val``  ``[r, P]`` A's dtype: the values at those columns, padded with 0.0;
- ``a_nnz``  ``[r]`` int32: how many entries of row ``i`` are real;

with ``P`` the largest row count (:func:`flylora_runtime.weights.packing.compact_rows`). "Nonzero" is
decided on the raw bits, so ``-0.0`` is kept and the form round-trips bit for bit. Padded entries hold
value 0.0 at column 0, so a kernel may use all ``P`` entries without reading ``a_nnz`` (they add
``0 * x[0]``). B and d are kept as they are.

The authors' init gives every row exactly ``p = in // (r // top_k)`` nonzeros (a quarter of the row for
r=32, k=8); merged adapters (the mean of several) have more, plain LoRA's dense A has ``P = in`` and is
stored dense instead (``a_idx`` empty) because the compact form would be larger.

Worked example, Llama-3.1-8B paper config (r=32, k=8, seven projections, fp32): A holds 39.8 M numbers
(159 MB); compact A holds 10.0 M values (40 MB) + 10.0 M int16 indices (20 MB); with B (44.0 M, 176 MB)
the file shrinks from ~336 MB to ~236 MB (0.70x). See :func:`size_report`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flylora_runtime.format.config import FlyLoRAConfig
from flylora_runtime.format.errors import InvalidSafetensors
from flylora_runtime.format.modelspec import BaseModelSpec
from flylora_runtime.weights.dense import FlyLoRAAdapter, ModuleWeights
from flylora_runtime.weights.files import atomic_write
from flylora_runtime.weights.packing import compact_rows

COMPACT_FORMAT = "flylora-compact-v1"


@dataclass
class CompactModule:
    """One module in compact form (see the module docstring for each field)."""

    in_features: int
    a_idx: torch.Tensor  # [r, P] int16/int32, or [0] when dense
    a_val: torch.Tensor  # [r, P] (or [r, in] when dense)
    a_nnz: torch.Tensor  # [r] int32
    B: torch.Tensor
    d: torch.Tensor

    @property
    def dense(self) -> bool:
        return self.a_idx.numel() == 0

    def to_dense_A(self) -> torch.Tensor:
        if self.dense:
            return self.a_val.clone()
        r, p = self.a_val.shape
        A = torch.zeros(r, self.in_features, dtype=self.a_val.dtype)
        real = torch.arange(p).unsqueeze(0) < self.a_nnz.long().unsqueeze(1)
        rows = torch.arange(r).unsqueeze(1).expand(r, p)
        A[rows[real], self.a_idx.long()[real]] = self.a_val[real]
        return A


@dataclass
class CompactAdapter:
    config: FlyLoRAConfig
    modules: dict[str, CompactModule]

    @classmethod
    def from_adapter(cls, adapter: FlyLoRAAdapter) -> "CompactAdapter":
        return cls(config=adapter.config,
                   modules={m: compact_module(w) for m, w in adapter.modules.items()})

    def to_adapter(self) -> FlyLoRAAdapter:
        return FlyLoRAAdapter(
            config=self.config,
            modules={m: ModuleWeights(A=c.to_dense_A(), B=c.B.clone(), d=c.d.clone()) for m, c in self.modules.items()},
        )

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file; the config and per-module ``in_features`` live in its metadata."""
        tensors = {}
        in_features = {}
        for m, c in self.modules.items():
            tensors[f"{m}.a_idx"] = c.a_idx.contiguous()
            tensors[f"{m}.a_val"] = c.a_val.contiguous()
            tensors[f"{m}.a_nnz"] = c.a_nnz.contiguous()
            tensors[f"{m}.b"] = c.B.contiguous()
            tensors[f"{m}.d"] = c.d.contiguous()
            in_features[m] = c.in_features
        meta = {"format": COMPACT_FORMAT, "config": json.dumps(self.config.to_dict()),
                "in_features": json.dumps(in_features)}
        atomic_write(os.fspath(path), lambda p: save_file(tensors, p, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompactAdapter":
        """Load a file written by :meth:`save` (our own output: validated before it was written)."""
        with safe_open(os.fspath(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != COMPACT_FORMAT:
                raise InvalidSafetensors(f"expected format {COMPACT_FORMAT!r}, found {meta.get('format')!r}",
                                         file=os.path.basename(os.fspath(path)))
            config = FlyLoRAConfig.from_dict(json.loads(meta["config"]))
            in_features = json.loads(meta["in_features"])
            modules = {
                m: CompactModule(in_features=n, a_idx=fh.get_tensor(f"{m}.a_idx"), a_val=fh.get_tensor(f"{m}.a_val"),
                                 a_nnz=fh.get_tensor(f"{m}.a_nnz"), B=fh.get_tensor(f"{m}.b"), d=fh.get_tensor(f"{m}.d"))
                for m, n in in_features.items()
            }
        return cls(config=config, modules=modules)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for c in self.modules.values() for t in (c.a_idx, c.a_val, c.a_nnz, c.B, c.d))


def index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


def compact_module(w: ModuleWeights) -> CompactModule:
    """Compact one module; falls back to dense A when compact would not be smaller."""
    A = w.A.contiguous()
    r, n_in = A.shape
    idx_dt = index_dtype(n_in)
    idx, val, nnz = compact_rows(A)
    p = idx.shape[1]
    idx_size = torch.empty(0, dtype=idx_dt).element_size()
    if p * (A.element_size() + idx_size) >= n_in * A.element_size():
        return CompactModule(in_features=n_in, a_idx=torch.empty(0, dtype=idx_dt), a_val=A.clone(),
                             a_nnz=torch.full((r,), n_in, dtype=torch.int32), B=w.B, d=w.d)
    return CompactModule(in_features=n_in, a_idx=idx.to(idx_dt).contiguous(), a_val=val.contiguous(),
                         a_nnz=nnz.to(torch.int32), B=w.B, d=w.d)


def size_report(base: BaseModelSpec, targets: tuple[str, ...], r: int, top_k: int, value_bytes: int = 4) -> dict:
    """Bytes of the authors' file vs the compact form for an adapter with the authors' sparse A init.

    Computed from shapes (each A row holds ``in // (r // top_k)`` nonzeros); safetensors headers ignored.
    """
    authors = compact = 0
    for t in targets:
        n_in, n_out = base.shapes[t]
        p = n_in // (r // top_k)
        idx_bytes = 2 if n_in <= 32767 else 4
        a_dense = r * n_in * value_bytes
        a_compact = min(r * p * (value_bytes + idx_bytes), a_dense) + r * 4
        bd = (n_out * r + r) * value_bytes
        authors += a_dense + bd
        compact += a_compact + bd
    authors *= base.num_layers
    compact *= base.num_layers
    return {"base_model": base.name, "r": r, "top_k": top_k, "targets": list(targets),
            "numbers": base.total_numbers(targets, r), "authors_bytes": authors, "compact_bytes": compact,
            "ratio": compact / authors}
