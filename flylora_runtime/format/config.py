"""The adapter's configuration, read from a PEFT-style ``adapter_config.json``.

Torch-free: the gateway imports this module (through :mod:`flylora_runtime.format.checkpoint`) to validate
uploads without loading torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from flylora_runtime.format.errors import InvalidConfig

Routing = Literal["signed", "magnitude"]
ROUTINGS: tuple[str, ...] = ("signed", "magnitude")

#: Projection names the runtime knows how to shape for Llama-family models.
KNOWN_PROJECTIONS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)


@dataclass(frozen=True)
class FlyLoRAConfig:
    """What an adapter is, independent of its tensors.

    Attributes:
        r: total rank (number of rank-wise "experts", columns of B). Positive integer.
        top_k: ranks that fire per token, ``0 < top_k <= r``. A plain PEFT LoRA checkpoint has no
            ``top_k`` and is served as ``top_k = r`` (exactly plain LoRA).
        lora_alpha: scaling numerator; the delta is scaled by ``lora_alpha / r`` (not ``/ top_k``).
        target_modules: projection names (``q_proj``...) the adapter touches.
        routing: ``"signed"`` (the authors' code: top-k of ``A x + d``) or ``"magnitude"`` (the paper's
            Eq. 7: top-k of ``|A x + d|``). Our extension field ``flylora_routing``; default signed.
        bias_u: the training-time bias update rate (kept for round-trips; unused at serving time).
        base_model_name_or_path: what the adapter was trained on (informational).
        is_flylora: False for a plain PEFT LoRA checkpoint (no ``top_k`` in the config).
        raw: the original JSON object, kept so the authors' form round-trips.
    """

    r: int
    top_k: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    routing: Routing = "signed"
    bias_u: float = 0.0
    base_model_name_or_path: str | None = None
    is_flylora: bool = True
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def scaling(self) -> float:
        """``lora_alpha / r``, the factor applied to ``B @ (y * m)``."""
        return self.lora_alpha / self.r

    @classmethod
    def from_dict(cls, obj: Any, *, file: str = "adapter_config.json") -> "FlyLoRAConfig":
        """Parse and check a config object; raise :class:`InvalidConfig` naming the field."""
        if not isinstance(obj, dict):
            raise InvalidConfig(f"expected a JSON object, found {type(obj).__name__}", file=file)
        peft_type = obj.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise InvalidConfig(f"expected peft_type 'LORA', found {peft_type!r}", file=file, key="peft_type")
        r = _positive_int(obj, "r", file)
        is_flylora = obj.get("top_k") is not None
        top_k = _positive_int(obj, "top_k", file) if is_flylora else r
        if top_k > r:
            raise InvalidConfig(f"expected 0 < top_k <= r = {r}, found top_k = {top_k}", file=file, key="top_k")
        alpha = obj.get("lora_alpha", r)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise InvalidConfig(f"expected a finite number > 0, found {alpha!r}", file=file, key="lora_alpha")
        if obj.get("use_rslora"):
            raise InvalidConfig("expected use_rslora false (FlyLoRA scales by alpha / r), found true",
                                file=file, key="use_rslora")
        if obj.get("use_dora"):
            raise InvalidConfig("expected use_dora false (DoRA is not FlyLoRA), found true", file=file, key="use_dora")
        bias = obj.get("bias", "none")
        if bias not in ("none", None):
            raise InvalidConfig(f"expected bias 'none', found {bias!r}", file=file, key="bias")
        if obj.get("lora_bias"):
            raise InvalidConfig("expected lora_bias false, found true", file=file, key="lora_bias")
        routing = obj.get("flylora_routing", "signed")
        if routing not in ROUTINGS:
            raise InvalidConfig(f"expected one of {ROUTINGS}, found {routing!r}", file=file, key="flylora_routing")
        targets = obj.get("target_modules")
        if isinstance(targets, str):
            raise InvalidConfig(
                f"expected a list of module names, found the pattern string {targets!r}",
                file=file, key="target_modules")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise InvalidConfig(f"expected a non-empty list of module names, found {targets!r}",
                                file=file, key="target_modules")
        bias_u = obj.get("bias_u", 0.0) or 0.0
        if isinstance(bias_u, bool) or not isinstance(bias_u, (int, float)) or not math.isfinite(bias_u):
            raise InvalidConfig(f"expected a finite number, found {bias_u!r}", file=file, key="bias_u")
        base = obj.get("base_model_name_or_path")
        return cls(
            r=r, top_k=top_k, lora_alpha=float(alpha), target_modules=tuple(sorted(set(targets))),
            routing=routing, bias_u=float(bias_u),
            base_model_name_or_path=base if isinstance(base, str) else None,
            is_flylora=is_flylora, raw=dict(obj),
        )

    @classmethod
    def from_json_bytes(cls, data: bytes, *, file: str = "adapter_config.json") -> "FlyLoRAConfig":
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidConfig(f"expected valid UTF-8 JSON, found a parse error: {exc}", file=file) from None
        return cls.from_dict(obj, file=file)

    def to_dict(self) -> dict[str, Any]:
        """The authors' config object: the original JSON when there is one, else a fresh one."""
        if self.raw:
            return dict(self.raw)
        out: dict[str, Any] = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": list(self.target_modules),
            "inference_mode": True,
        }
        if self.is_flylora:
            out.update({"top_k": self.top_k, "bias_u": self.bias_u, "init_lora_weights": "sparse"})
            if self.routing != "signed":
                out["flylora_routing"] = self.routing
        return out


def _positive_int(obj: dict, key: str, file: str) -> int:
    val = obj.get(key)
    if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise InvalidConfig(f"expected a positive integer, found {val!r}", file=file, key=key)
    return val
