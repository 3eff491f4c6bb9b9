"""How many adapters the engine holds: device slots (``--max-loras``) and CPU cache (``--max-cpu-loras``)
sized from a memory budget instead of fixed constants.

vLLM runs at most ``max_loras`` distinct adapters per step, so with fewer slots than sequences a batch of
requests for many adapters is served a few adapters at a time (16 clients on 16 adapters through the old
default of 4 slots: 0.32x the base model's tokens/s; through 16 slots: 0.71x). FlyLoRA slots are small, so
by default the engine takes as many slots as it batches sequences (``--max-num-seqs``), as far as a
fraction of the device's memory allows, and a CPU cache as large as a fraction of host memory allows:

- **slot bytes**: what the plugin allocates per slot (:func:`slot_bytes_per_layer`: the same layout
  :mod:`flylora_runtime.vllm_plugin.layers` picks, measured by allocating one slot of every adapted layer
  kind) for the served model at ``--max-lora-rank``, times the number of decoder layers;
- ``max_loras = min(max_num_seqs, floor(adapter_memory_fraction * device memory / slot bytes))``, at least 1
  (device memory: the GPU's on CUDA; RAM, or the container's memory limit, on CPU);
- **cached adapter bytes**: an adapter at ``--max-lora-rank`` on all seven projections as the engine keeps
  it in its CPU cache (:func:`cached_adapter_bytes`: A and B in the LoRA dtype, plus, on CPU, the slot
  image of its A kept for fast re-activation), the worst case (dense A rows, as plain LoRA has);
- ``max_cpu_loras = max(max_loras, floor(adapter_cache_fraction * host memory / cached adapter bytes))``.

An explicit ``--max-loras`` / ``--max-cpu-loras`` overrides its part. The arithmetic is printed when the
engine starts (:meth:`MemoryPlan.describe`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from flylora_runtime.format.modelspec import BaseModelSpec

GiB = 2**30
MiB = 2**20

#: The layers vLLM wraps for the Llama family, as (name, input projection, output projections): q/k/v share
#: one ``qkv_proj`` call and gate/up one ``gate_up_proj`` call.
LAYER_KINDS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("o_proj", ("o_proj",)),
               ("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",)))

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def lora_dtype(engine_dtype: str, model_config: dict) -> str:
    """The LoRA dtype vLLM will use: the engine's dtype, ``auto`` resolved as vLLM resolves it (the
    checkpoint's dtype, with fp32 checkpoints served in 16 bits: bf16)."""
    if engine_dtype != "auto":
        return engine_dtype
    found = str(model_config.get("dtype") or model_config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return found if found in ("bfloat16", "float16") else "bfloat16"


def slot_layout(device_type: str, in_features: int, dtype: str) -> dict:
    """The keyword arguments the plugin passes to ``allocate_slots`` for A (its own ``_a_layout``)."""
    import torch

    from flylora_runtime.vllm_plugin.layers import _a_layout

    return _a_layout(torch.device(device_type), in_features, getattr(torch, dtype))


def _one_slot(spec: BaseModelSpec, max_rank: int, dtype: str, device_type: str) -> dict[str, tuple[int, int]]:
    """Per adapted layer kind: ``(bytes of one slot, bytes of its A part)``, as the plugin allocates it.

    Measured, not restated: one slot of each kind is allocated (on the CPU; sizes do not depend on the
    device) with the layout the plugin uses on ``device_type``, and its buffers' bytes summed.
    """
    import torch

    from flylora_runtime.kernels import allocate_slots

    nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
    out = {}
    for name, projections in LAYER_KINDS:
        in_features = spec.shapes[projections[0]][0]
        s = allocate_slots(1, max_rank, in_features, [spec.shapes[p][1] for p in projections],
                           b_dtype=getattr(torch, dtype), device="cpu",
                           **slot_layout(device_type, in_features, dtype))
        out[name] = (nbytes(s.a_idx, s.a_val, s.a_nnz, s.a_mask, s.b, s.d, s.k, s.r, s.magnitude),
                     nbytes(s.a_idx, s.a_val, s.a_mask))
    return out


def slot_bytes_per_layer(spec: BaseModelSpec, max_rank: int, dtype: str, device_type: str) -> dict[str, int]:
    """Bytes of one slot in each adapted layer kind of one decoder layer, as the plugin allocates it."""
    return {name: total for name, (total, _) in _one_slot(spec, max_rank, dtype, device_type).items()}


def cached_adapter_bytes(spec: BaseModelSpec, max_rank: int, dtype: str, device_type: str) -> int:
    """Host bytes of one adapter in the engine's CPU cache, at ``max_rank`` on all seven projections.

    vLLM keeps A ``[r, in]`` and B ``[out, r]`` per projection in the LoRA dtype (pinned host memory on a
    GPU), and the plugin d ``[r]`` in fp32. On CPU the plugin also keeps the adapter's slot images, whose A
    is a copy in the slot layout, at most a slot's A part (dense rows; none when the slots hold dense fp32
    A and the adapter's A is fp32 already); their B and d are views. On a GPU no image is kept.
    """
    numbers = sum(max_rank * (i + o) for i, o in spec.shapes.values()) * spec.num_layers
    biases = 4 * max_rank * len(spec.shapes) * spec.num_layers
    image = 0
    if device_type == "cpu":
        dense_fp32 = "packed" not in slot_layout(device_type, spec.shapes["q_proj"][0], dtype) and dtype == "float32"
        if not dense_fp32:
            image = spec.num_layers * sum(a for _, a in _one_slot(spec, max_rank, dtype, device_type).values())
    return numbers * _DTYPE_BYTES[dtype] + biases + image


@dataclass(frozen=True)
class MemoryPlan:
    """The sizing decision and every number behind it (bytes unless named otherwise)."""

    model: str
    device_type: str  # "cuda" or "cpu"
    dtype: str
    max_rank: int
    num_layers: int
    slot_bytes_per_layer: dict[str, int]
    slot_bytes: int
    device_memory: int
    memory_fraction: float
    cache_adapter_bytes: int
    host_memory: int
    cache_fraction: float
    max_num_seqs: int
    max_loras: int
    max_cpu_loras: int
    max_loras_source: str  # "budget" or "explicit"
    max_cpu_loras_source: str

    @property
    def slot_budget(self) -> int:
        return int(self.memory_fraction * self.device_memory)

    @property
    def cache_budget(self) -> int:
        return int(self.cache_fraction * self.host_memory)

    @property
    def slots_fitting(self) -> int:
        return self.slot_budget // self.slot_bytes

    @property
    def cache_fitting(self) -> int:
        return self.cache_budget // self.cache_adapter_bytes

    def describe(self) -> list[str]:
        """Human-readable lines with the arithmetic (printed at start)."""
        where = "GPU memory" if self.device_type == "cuda" else "memory (RAM or the container's limit)"
        kinds = ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in self.slot_bytes_per_layer.items())
        lines = [
            f"adapter memory for {self.model}, LoRA dtype {self.dtype}, rank up to {self.max_rank}, {self.device_type}:",
            f"  one FlyLoRA slot = {self.num_layers} layers x ({kinds}) = {self.slot_bytes / MiB:.1f} MiB",
        ]
        if self.max_loras_source == "budget":
            lines.append(
                f"  device slots: {self.memory_fraction:g} x {self.device_memory / GiB:.1f} GiB {where} = "
                f"{self.slot_budget / GiB:.2f} GiB / {self.slot_bytes / MiB:.1f} MiB = {self.slots_fitting} slots; "
                f"--max-loras {self.max_loras} (at most --max-num-seqs {self.max_num_seqs}, at least 1) = "
                f"{self.max_loras * self.slot_bytes / GiB:.2f} GiB")
        else:
            lines.append(f"  device slots: --max-loras {self.max_loras} set explicitly = "
                         f"{self.max_loras * self.slot_bytes / GiB:.2f} GiB")
        if self.max_cpu_loras_source == "budget":
            lines.append(
                f"  CPU cache: {self.cache_fraction:g} x {self.host_memory / GiB:.1f} GiB host memory = "
                f"{self.cache_budget / GiB:.2f} GiB / {self.cache_adapter_bytes / MiB:.1f} MiB per adapter (rank "
                f"{self.max_rank}, all 7 projections) = {self.cache_fitting}; --max-cpu-loras {self.max_cpu_loras} "
                f"(at least --max-loras) = up to {self.max_cpu_loras * self.cache_adapter_bytes / GiB:.2f} GiB")
        else:
            lines.append(f"  CPU cache: --max-cpu-loras {self.max_cpu_loras} set explicitly = up to "
                         f"{self.max_cpu_loras * self.cache_adapter_bytes / GiB:.2f} GiB")
        if self.max_loras < self.max_num_seqs:
            lines.append(f"  note: {self.max_loras} slots < {self.max_num_seqs} sequences: a batch runs at most "
                         f"{self.max_loras} distinct adapters per step (raise --adapter-memory-fraction or "
                         "--max-loras)")
        return lines


def plan(spec: BaseModelSpec, *, model: str, dtype: str, max_rank: int, max_num_seqs: int,
         max_loras: int, max_cpu_loras: int, memory_fraction: float, cache_fraction: float,
         device_type: str, device_memory: int, host_memory: int) -> MemoryPlan:
    """The slot and cache counts for these settings (``max_loras``/``max_cpu_loras`` 0: from the budget)."""
    per_layer = slot_bytes_per_layer(spec, max_rank, dtype, device_type)
    slot = spec.num_layers * sum(per_layer.values())
    cached = cached_adapter_bytes(spec, max_rank, dtype, device_type)
    loras, loras_src = max_loras, "explicit"
    if not max_loras:
        loras, loras_src = max(1, min(max_num_seqs, int(memory_fraction * device_memory) // slot)), "budget"
        if max_cpu_loras:
            loras = min(loras, max_cpu_loras)  # vLLM needs max_cpu_loras >= max_loras
    cpu, cpu_src = max_cpu_loras, "explicit"
    if not max_cpu_loras:
        cpu, cpu_src = max(loras, int(cache_fraction * host_memory) // cached), "budget"
    return MemoryPlan(model=model, device_type=device_type, dtype=dtype, max_rank=max_rank,
                      num_layers=spec.num_layers, slot_bytes_per_layer=per_layer, slot_bytes=slot,
                      device_memory=device_memory, memory_fraction=memory_fraction, cache_adapter_bytes=cached,
                      host_memory=host_memory, cache_fraction=cache_fraction, max_num_seqs=max_num_seqs,
                      max_loras=loras, max_cpu_loras=cpu, max_loras_source=loras_src, max_cpu_loras_source=cpu_src)


def host_memory_bytes() -> int:
    """Physical memory, or the cgroup (container) memory limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def device_memory() -> tuple[str, int]:
    """``("cuda", GPU 0's memory)`` when a GPU is visible, else ``("cpu", host memory)``."""
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda", int(torch.cuda.get_device_properties(0).total_memory)
    except ImportError:  # pragma: no cover
        pass
    return "cpu", host_memory_bytes()


def plan_for(config) -> MemoryPlan:
    """:func:`plan` for an :class:`~flylora_runtime.engine.launcher.EngineConfig` on this machine."""
    with open(Path(config.config_dir(), "config.json"), encoding="utf-8") as fh:
        model_config = json.load(fh)
    spec = BaseModelSpec.from_hf_config(model_config, name=config.served_model_name)
    device_type, memory = device_memory()
    return plan(spec, model=config.served_model_name, dtype=lora_dtype(config.dtype, model_config),
                max_rank=config.max_lora_rank, max_num_seqs=config.max_num_seqs, max_loras=config.max_loras,
                max_cpu_loras=config.max_cpu_loras, memory_fraction=config.adapter_memory_fraction,
                cache_fraction=config.adapter_cache_fraction, device_type=device_type, device_memory=memory,
                host_memory=host_memory_bytes())
