"""FlyLoRA adapters in memory: the authors' dense form, loaded only after validation.

``FlyLoRAAdapter.load`` validates first (:mod:`flylora_runtime.format.checkpoint`), then reads the tensors
with safetensors; ``save`` writes the authors' PEFT layout atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from flylora_runtime.format.checkpoint import (
    CONFIG_NAME,
    DEFAULT_MAX_BYTES,
    WEIGHTS_NAME,
    lora_keys,
    validate_dir,
)
from flylora_runtime.format.config import FlyLoRAConfig
from flylora_runtime.format.modelspec import BaseModelSpec
from flylora_runtime.weights.files import atomic_write, write_text


@dataclass
class ModuleWeights:
    """One adapted linear layer, authors' form.

    Attributes:
        A: ``[r, in]`` frozen sparse projection (stored dense, zeros included).
        B: ``[out, r]`` up-projection; column ``j`` is rank-expert ``j``.
        d: ``[r]`` routing bias (zeros for plain LoRA).
    """

    A: torch.Tensor
    B: torch.Tensor
    d: torch.Tensor


@dataclass
class FlyLoRAAdapter:
    """A whole adapter: config plus weights for every adapted module (keyed by HF module path)."""

    config: FlyLoRAConfig
    modules: dict[str, ModuleWeights]

    @classmethod
    def load(cls, adapter_dir: str | os.PathLike, base: BaseModelSpec, *, max_bytes: int = DEFAULT_MAX_BYTES
             ) -> "FlyLoRAAdapter":
        """Validate ``adapter_dir`` against ``base``, then load it. Plain PEFT LoRA gets ``d = 0``."""
        manifest = validate_dir(adapter_dir, base, max_bytes=max_bytes)
        state = load_file(os.path.join(os.fspath(adapter_dir), WEIGHTS_NAME))
        modules = {}
        for m in manifest.modules:
            ka, kb, kd = lora_keys(m)
            a, b = state[ka], state[kb]
            d = state[kd] if kd in state else torch.zeros(manifest.config.r, dtype=a.dtype)
            modules[m] = ModuleWeights(A=a, B=b, d=d)
        return cls(config=manifest.config, modules=modules)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The authors' tensor keys and values (``lora_topk_bias`` only for FlyLoRA adapters)."""
        out = {}
        for m, w in self.modules.items():
            ka, kb, kd = lora_keys(m)
            out[ka] = w.A.contiguous()
            out[kb] = w.B.contiguous()
            if self.config.is_flylora:
                out[kd] = w.d.contiguous()
        return out

    def save(self, adapter_dir: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (each atomically)."""
        adapter_dir = os.fspath(adapter_dir)
        os.makedirs(adapter_dir, exist_ok=True)
        atomic_write(os.path.join(adapter_dir, CONFIG_NAME),
                     lambda p: write_text(p, json.dumps(self.config.to_dict(), indent=2) + "\n"))
        atomic_write(os.path.join(adapter_dir, WEIGHTS_NAME),
                     lambda p: save_file(self.state_dict(), p, metadata={"format": "pt"}))

    def numel(self) -> int:
        return sum(w.A.numel() + w.B.numel() + w.d.numel() for w in self.modules.values())
