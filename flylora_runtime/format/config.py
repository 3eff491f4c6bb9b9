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

#: Largest rank any adapter may declare (vLLM's largest --max-lora-rank is 512); the engine's own, smaller
#: limit is checked separately (``validate_files(max_rank=...)``).
MAX_RANK = 4096
#: Bounds on list fields of the config (a real one has at most 7 targets and one entry per layer).
MAX_TARGETS = 64
MAX_LAYERS = 4096
MAX_NAME_CHARS = 256
#: ``init_lora_weights`` values that only set the initial adapter weights (the saved adapter is a plain LoRA);
#: others (PiSSA, OLoRA, LoftQ, CorDA) change the base model and are refused, as vLLM does.
WEIGHT_ONLY_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga", "sparse")
#: PEFT features vLLM does not implement: a config that uses them is refused here, not in the engine.
UNSUPPORTED_FEATURES = ("modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication",
                        "alora_invocation_tokens", "use_bdlora", "use_qalora")

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
    #: ``layers_to_transform``: the layer indices adapted, or None for every layer.
    layers: tuple[int, ...] | None = None

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
            raise InvalidConfig(f"expected peft_type 'LORA', found {_show(peft_type)}", file=file, key="peft_type")
        r = _positive_int(obj, "r", file)
        is_flylora = obj.get("top_k") is not None
        top_k = _positive_int(obj, "top_k", file) if is_flylora else r
        if top_k > r:
            raise InvalidConfig(f"expected 0 < top_k <= r = {r}, found top_k = {top_k}", file=file, key="top_k")
        alpha = obj.get("lora_alpha", r)
        if not _finite_number(alpha) or alpha <= 0:
            raise InvalidConfig(f"expected a finite number > 0, found {_show(alpha)}", file=file, key="lora_alpha")
        if obj.get("use_rslora"):
            raise InvalidConfig("expected use_rslora false (FlyLoRA scales by alpha / r), found true",
                                file=file, key="use_rslora")
        if obj.get("use_dora"):
            raise InvalidConfig("expected use_dora false (DoRA is not FlyLoRA), found true", file=file, key="use_dora")
        bias = obj.get("bias", "none")
        if bias not in ("none", None):
            raise InvalidConfig(f"expected bias 'none', found {_show(bias)}", file=file, key="bias")
        if obj.get("lora_bias"):
            raise InvalidConfig("expected lora_bias false, found true", file=file, key="lora_bias")
        for feature in UNSUPPORTED_FEATURES:
            if obj.get(feature):
                raise InvalidConfig(f"expected no {feature} (not supported by the engine), found {_show(obj[feature])}",
                                    file=file, key=feature)
        init = obj.get("init_lora_weights", True)
        if not isinstance(init, (bool, str)) or (isinstance(init, str) and init.lower() not in WEIGHT_ONLY_INITS):
            raise InvalidConfig(
                f"expected init_lora_weights true, false or one of {WEIGHT_ONLY_INITS}, found {_show(init)} (inits "
                "that change the base model's weights cannot be served)", file=file, key="init_lora_weights")
        routing = obj.get("flylora_routing", "signed")
        if not isinstance(routing, str) or routing not in ROUTINGS:
            raise InvalidConfig(f"expected one of {ROUTINGS}, found {_show(routing)}", file=file,
                                key="flylora_routing")
        targets = obj.get("target_modules")
        if isinstance(targets, str):
            raise InvalidConfig(
                f"expected a list of module names, found the pattern string {_show(targets)}",
                file=file, key="target_modules")
        if (not isinstance(targets, list) or not targets or len(targets) > MAX_TARGETS
                or not all(isinstance(t, str) and 0 < len(t) <= MAX_NAME_CHARS for t in targets)):
            raise InvalidConfig(f"expected a non-empty list of at most {MAX_TARGETS} module names, found "
                                f"{_show(targets)}", file=file, key="target_modules")
        bias_u = obj.get("bias_u", 0.0) or 0.0
        if not _finite_number(bias_u):
            raise InvalidConfig(f"expected a finite number, found {_show(bias_u)}", file=file, key="bias_u")
        base = obj.get("base_model_name_or_path")
        return cls(
            r=r, top_k=top_k, lora_alpha=float(alpha), target_modules=tuple(sorted(set(targets))),
            routing=routing, bias_u=float(bias_u),  # type: ignore[arg-type]
            base_model_name_or_path=base if isinstance(base, str) and len(base) <= MAX_NAME_CHARS else None,
            is_flylora=is_flylora, raw=dict(obj), layers=_layers(obj.get("layers_to_transform"), file),
        )

    @classmethod
    def from_json_bytes(cls, data: bytes, *, file: str = "adapter_config.json") -> "FlyLoRAConfig":
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            # ValueError covers bad UTF-8, JSON syntax and integers past Python's digit limit; RecursionError
            # deep nesting. The caller caps the size (MAX_CONFIG_BYTES), which bounds the parse's memory.
            reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)[:200]
            raise InvalidConfig(f"expected valid UTF-8 JSON, found a parse error: {reason}", file=file) from None
        return cls.from_dict(obj, file=file)

    def canonical_dict(self) -> dict[str, Any]:
        """The config as the service stores it: only the fields that define the adapter, all validated.

        What an engine reads is then exactly what was checked (no PEFT option the validator ignored, such as a
        pattern the engine would evaluate, reaches it).
        """
        out: dict[str, Any] = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.lora_alpha,
            "lora_dropout": 0.0, "bias": "none", "target_modules": list(self.target_modules),
            "inference_mode": True,
        }
        if self.base_model_name_or_path is not None:
            out["base_model_name_or_path"] = self.base_model_name_or_path
        if self.layers is not None:
            out["layers_to_transform"] = list(self.layers)
        if self.is_flylora:
            out.update({"top_k": self.top_k, "bias_u": self.bias_u, "init_lora_weights": "sparse",
                        "flylora_routing": self.routing})
        return out

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


def _show(value: Any) -> str:
    """A value for a message, cut short (it comes from an uploaded file)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _finite_number(value: Any) -> bool:
    """A JSON number that converts to a finite float (a huge integer does not, and must not raise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return abs(value) <= 1 << 53
    return math.isfinite(value)


def _positive_int(obj: dict, key: str, file: str) -> int:
    val = obj.get(key)
    if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise InvalidConfig(f"expected a positive integer, found {_show(val)}", file=file, key=key)
    if val > MAX_RANK:
        raise InvalidConfig(f"expected at most {MAX_RANK}, found {_show(val)}", file=file, key=key)
    return val


def _layers(value: Any, file: str) -> tuple[int, ...] | None:
    """``layers_to_transform``: None (every layer), one index, or a list of indices; the range is checked
    against the base model later."""
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(items, list) or not items or len(items) > MAX_LAYERS
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < MAX_LAYERS for x in items)):
        raise InvalidConfig(f"expected a layer index or a non-empty list of layer indices, found {_show(value)}",
                            file=file, key="layers_to_transform")
    return tuple(sorted(set(items)))
