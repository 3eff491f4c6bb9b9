"""The base model's adaptable linear layers, derived from its Hugging Face ``config.json``.

Torch-free, so the gateway can validate uploads without importing torch. Covers the Llama family
(Llama, Mistral, Qwen2/3), which is what vLLM's LoRA path and the authors' experiments use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from flylora_runtime.format.errors import BaseModelMismatch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

#: projection name -> parent block in the module path
PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


@dataclass(frozen=True)
class BaseModelSpec:
    """Shapes of the base model's adaptable projections.

    Attributes:
        model_type: the HF ``model_type`` (``llama``...).
        num_layers: decoder layers.
        shapes: projection name -> ``(in_features, out_features)``.
        name: an identifier for messages (the directory or hub id).
    """

    model_type: str
    num_layers: int
    shapes: dict[str, tuple[int, int]]
    name: str = "base model"

    @classmethod
    def from_hf_config(cls, cfg: dict, *, name: str = "base model") -> "BaseModelSpec":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise BaseModelMismatch(
                f"expected a base model of type {SUPPORTED_MODEL_TYPES}, found {model_type!r} ({name})")
        hidden = int(cfg["hidden_size"])
        inter = int(cfg["intermediate_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        shapes = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        return cls(model_type=model_type, num_layers=int(cfg["num_hidden_layers"]), shapes=shapes, name=name)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "BaseModelSpec":
        path = os.path.join(os.fspath(model_dir), "config.json")
        with open(path, encoding="utf-8") as fh:
            return cls.from_hf_config(json.load(fh), name=os.fspath(model_dir))

    @staticmethod
    def module_path(layer: int, proj: str) -> str:
        """``model.layers.{layer}.{self_attn|mlp}.{proj}``: the module's path inside the HF model."""
        return f"model.layers.{layer}.{PARENT[proj]}.{proj}"

    def parse_module_path(self, path: str) -> tuple[int, str] | None:
        """Inverse of :meth:`module_path`; None if ``path`` is not an adaptable module of this model."""
        parts = path.split(".")
        if len(parts) != 5 or parts[0] != "model" or parts[1] != "layers" or not parts[2].isdigit():
            return None
        layer, parent, proj = int(parts[2]), parts[3], parts[4]
        if proj not in self.shapes or PARENT[proj] != parent or not 0 <= layer < self.num_layers:
            return None
        return layer, proj

    def shape_of(self, path: str) -> tuple[int, int]:
        parsed = self.parse_module_path(path)
        if parsed is None:
            raise KeyError(path)
        return self.shapes[parsed[1]]

    def max_adapter_tensors(self) -> int:
        """The most tensors a valid adapter can hold: A, B and the routing bias of every projection of every
        layer (bounds the safetensors header that is read, see :mod:`.header`)."""
        return self.num_layers * len(self.shapes) * 3

    def total_numbers(self, targets: tuple[str, ...], r: int) -> int:
        """Numbers in an adapter (A + B + d) targeting ``targets`` on every layer at rank ``r``."""
        per_layer = sum(r * self.shapes[t][0] + self.shapes[t][1] * r + r for t in targets)
        return per_layer * self.num_layers


#: Llama-3.1-8B, the paper's configuration, for size reports.
LLAMA_3_1_8B = BaseModelSpec.from_hf_config(
    {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32,
    },
    name="Llama-3.1-8B",
)
