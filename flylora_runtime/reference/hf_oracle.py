"""FlyLoRA on a ``transformers`` model: several adapters at once, one chosen per batch row.

This is the end-to-end oracle for the engine: every adapted ``nn.Linear`` computes
``W x + reference.flylora_delta(x, ...)`` with the pure-torch reference, so generating with it gives the
authors' model's output (with d frozen, see FLYLORA.md).

    model = AutoModelForCausalLM.from_pretrained(dir)
    fly = attach_flylora(model, {"support": adapter_a, "legal": adapter_b})
    with fly.rows(["support", None, "legal"]):   # one entry per batch row; None = base model
        out = model.generate(**batch)
    fly.detach()                                  # restores the original modules
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from flylora_runtime.weights.dense import FlyLoRAAdapter
from flylora_runtime.reference.ops import LayerAdapter, flylora_delta


class _RowState:
    """Which adapter each batch row uses (index into the attached adapters, -1 for none)."""

    def __init__(self) -> None:
        self.row_adapter: torch.Tensor | None = None


class FlyLoRALinear(nn.Module):
    """An ``nn.Linear`` plus the FlyLoRA deltas of the adapters that target it.

    ``index_map[i]`` maps attached adapter ``i`` to its position in ``layers`` (-1 if adapter ``i`` does not
    target this module).
    """

    def __init__(self, base: nn.Linear, layers: list[LayerAdapter], index_map: torch.Tensor, state: _RowState):
        super().__init__()
        self.base = base
        self.layers = layers
        self.index_map = index_map
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = self.state.row_adapter
        if rows is None or not self.layers:
            return out
        if rows.shape[0] != x.shape[0]:
            raise ValueError(f"rows() named {rows.shape[0]} rows but the batch has {x.shape[0]}")
        per_row = torch.where(rows >= 0, self.index_map[rows.clamp(min=0)], torch.full_like(rows, -1))
        tokens = x.reshape(-1, x.shape[-1])
        idx = per_row.repeat_interleave(tokens.shape[0] // x.shape[0])
        delta = flylora_delta(tokens, idx, self.layers)
        return out + delta.reshape(*out.shape[:-1], -1).to(out.dtype)


class AttachedFlyLoRA:
    """Handle returned by :func:`attach_flylora`."""

    def __init__(self, model: nn.Module, names: list[str], replaced: dict[str, tuple[nn.Module, nn.Linear]],
                 state: _RowState):
        self.model = model
        self.names = names
        self._replaced = replaced
        self._state = state

    @contextlib.contextmanager
    def rows(self, adapters: Sequence[str | None]) -> Iterator[None]:
        """Use ``adapters[b]`` (a name, or None for the base model) for batch row ``b`` inside the block."""
        unknown = [a for a in adapters if a is not None and a not in self.names]
        if unknown:
            raise KeyError(f"unknown adapters {unknown}; attached: {self.names}")
        self._state.row_adapter = torch.tensor([-1 if a is None else self.names.index(a) for a in adapters])
        try:
            yield
        finally:
            self._state.row_adapter = None

    def detach(self) -> None:
        """Put the original linear layers back."""
        for path, (parent, base) in self._replaced.items():
            setattr(parent, path.rsplit(".", 1)[-1], base)
        self._replaced.clear()


def attach_flylora(model: nn.Module, adapters: Mapping[str, FlyLoRAAdapter]) -> AttachedFlyLoRA:
    """Wrap every linear layer that any of ``adapters`` targets. Weights are used as given (fp32 math)."""
    names = list(adapters)
    state = _RowState()
    modules = sorted({m for a in adapters.values() for m in a.modules})
    replaced: dict[str, tuple[nn.Module, nn.Linear]] = {}
    for path in modules:
        parent_path, attr = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        base = getattr(parent, attr)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{path} is {type(base).__name__}, expected nn.Linear")
        layers: list[LayerAdapter] = []
        index_map = torch.full((len(names),), -1, dtype=torch.long)
        for i, name in enumerate(names):
            if path in adapters[name].modules:
                index_map[i] = len(layers)
                layers.append(LayerAdapter.from_adapter(adapters[name], path))
        setattr(parent, attr, FlyLoRALinear(base, layers, index_map, state))
        replaced[path] = (parent, base)
    return AttachedFlyLoRA(model, names, replaced, state)
