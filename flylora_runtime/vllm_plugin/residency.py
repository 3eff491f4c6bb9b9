"""Which adapters the engine holds, and where, on vLLM's ``/metrics``: what an inference gateway routes on.

vLLM's ``vllm:lora_requests_info`` lists adapters with requests in flight, not the adapters loaded: an idle
adapter in a device slot is absent from it. These gauges report residency, with the names of the upstream
proposal (vLLM pull request 54830, read by llm-d's ``lora-load-state-scorer`` and ``lora-residency-filter``
as its "LoRA Adapter Residency" metrics):

- ``vllm:lora_adapter_loaded{model_name, engine, adapter_name, level, pinned}`` = 1, one series per resident
  adapter: ``level="gpu"`` while it holds a device slot (``--max-loras``; the tier is called gpu on a CPU
  engine too), else ``"cpu"`` while it is only in the engine's CPU cache (``--max-cpu-loras``). The series
  disappears when the adapter is evicted or unloaded. ``adapter_name`` is the name requests use as
  ``model`` on the engine (the gateway's internal id, ``fl-...``).
- ``vllm:num_gpu_loaded_lora_adapters``, ``vllm:num_cpu_loaded_lora_adapters`` (every adapter in the CPU
  cache, the ones in slots included, as in the proposal), ``vllm:max_gpu_lora_adapters`` (slots).

Cardinality: the per-adapter series are bounded by ``--max-cpu-loras`` and, beyond that, by
``FLYLORA_RESIDENCY_MAX_SERIES`` (default 128): slot holders first, then the most recently used cached
adapters. The counts stay exact.

The LoRA manager lives in vLLM's worker process; ``/metrics`` is served by the API server. The worker
rewrites ``residency.json`` in the engine's metrics folder (:func:`.metrics.metrics_dir`) whenever the set
changes (a load, an eviction, a slot change, an unload; not on every step), and :class:`ResidencyCollector`
reads it at each scrape. The collector is registered by :func:`.metrics.install_metrics`; the worker's
wrappers are rows of :data:`.patches.PATCHES`.
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("flylora.residency")

RESIDENCY_FILE = "residency.json"
DEFAULT_MAX_SERIES = 128
LOADED = "vllm:lora_adapter_loaded"
NUM_GPU = "vllm:num_gpu_loaded_lora_adapters"
NUM_CPU = "vllm:num_cpu_loaded_lora_adapters"
MAX_GPU = "vllm:max_gpu_lora_adapters"
BASE_LABELS = ["model_name", "engine"]

#: lora_int_id -> the name requests use (filled by the worker's add_adapter; vLLM's LoRAModel has no name)
_names: dict[int, str] = {}
_last_written: str | None = None
_last_key: tuple | None = None
_installed = False


def snapshot(manager, model_name: str) -> dict:
    """The residency of a vLLM ``LoRAModelManager``: slot holders in slot order, then the cache, newest first.

    Only adapters loaded by the FlyLoRA loader count (vLLM's warm-up dummies carry no ``flylora`` info).
    """
    registered, active = manager._registered_adapters, manager._active_adapters
    pinned = set(getattr(registered, "pinned_items", ())) | set(getattr(active, "pinned_items", ()))
    real = {i: _names[i] for i, m in registered.cache.items()
            if getattr(m, "flylora", None) is not None and i in _names}
    in_slots = [i for i in manager.lora_index_to_id if i is not None and i in real]
    cached = [i for i in reversed(list(registered.order)) if i in real and i not in in_slots]
    adapters = [{"name": real[i], "level": "gpu" if i in in_slots else "cpu", "pinned": i in pinned}
                for i in in_slots + cached]
    return {"model_name": model_name, "max_gpu": manager.lora_slots, "adapters": adapters}


def _state_key(manager) -> tuple:
    """What :func:`snapshot` depends on, cheaply: the slots, the CPU-only adapters in LRU order, the pins.

    vLLM touches every adapter of a step in its LRU cache on every step (``add_adapter`` for each one), which
    reorders the cache without changing the snapshot while the adapters hold slots; this key changes only
    when the snapshot can."""
    registered, active = manager._registered_adapters, manager._active_adapters
    slots = tuple(manager.lora_index_to_id)
    in_slots = set(slots)
    return (slots, tuple(i for i in registered.order if i not in in_slots),
            tuple(sorted(getattr(registered, "pinned_items", ()))), tuple(sorted(getattr(active, "pinned_items", ()))))


def publish(worker_manager) -> None:
    """Rewrite ``residency.json`` (atomic rename) if the worker's residency changed since the last write.

    Called once per engine step (after vLLM's ``_apply_adapters``) and after each load, eviction or unload
    outside a step; a call that finds the same state as the last one returns after :func:`_state_key` (a
    few microseconds: with 16 distinct adapters per step, building the snapshot and its JSON for each of
    them took a tenth of the worker's time)."""
    global _last_written, _last_key
    manager = getattr(worker_manager, "_adapter_manager", None)
    if manager is None:
        return
    key = (id(manager), _state_key(manager))
    if key == _last_key:
        return
    from flylora_runtime.vllm_plugin.metrics import metrics_dir

    registered = manager._registered_adapters
    for lora_id in [i for i in _names if i not in registered]:
        del _names[lora_id]  # evicted or unloaded: forget its name (ids are never reused)
    text = json.dumps(snapshot(manager, getattr(worker_manager, "_flylora_model_name", "")))
    if text == _last_written:
        _last_key = key
        return
    target = os.path.join(metrics_dir(), RESIDENCY_FILE)
    try:
        with open(target + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(target + ".tmp", target)
        _last_written, _last_key = text, key
    except OSError as exc:
        logger.warning("cannot publish adapter residency in %s: %s", target, exc)


def read_residency(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, RESIDENCY_FILE)) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("adapters"), list) else None


def max_series() -> int:
    raw = os.environ.get("FLYLORA_RESIDENCY_MAX_SERIES", "")
    try:
        return max(0, int(raw)) if raw else DEFAULT_MAX_SERIES
    except ValueError:
        return DEFAULT_MAX_SERIES


class ResidencyCollector:
    """A prometheus_client collector: the worker's last residency snapshot, at scrape time."""

    def __init__(self, folder: str, limit: int | None = None):
        self.folder = folder
        self.limit = max_series() if limit is None else limit

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        data = read_residency(self.folder)
        if data is None:  # the worker has not built its LoRA manager yet
            return
        base = [str(data.get("model_name", "")), "0"]
        adapters = [a for a in data["adapters"] if isinstance(a, dict)]
        loaded = GaugeMetricFamily(LOADED, "Adapters resident in the engine, one series each (1): level gpu in a "
                                   "device slot, cpu only in the CPU cache.",
                                   labels=[*BASE_LABELS, "adapter_name", "level", "pinned"])
        for a in adapters[: self.limit]:
            loaded.add_metric([*base, str(a.get("name")), str(a.get("level")), "true" if a.get("pinned") else "false"],
                              1.0)
        counts = {NUM_GPU: ("Adapters in device slots.", sum(a.get("level") == "gpu" for a in adapters)),
                  NUM_CPU: ("Adapters in the engine's CPU cache (those in device slots included).", len(adapters)),
                  MAX_GPU: ("Device slots for adapters (--max-loras).", data.get("max_gpu", 0))}
        yield loaded
        for name, (doc, value) in counts.items():
            family = GaugeMetricFamily(name, doc, labels=BASE_LABELS)
            family.add_metric(base, float(value))
            yield family

    def describe(self):
        return []


def install_residency(folder: str) -> None:
    """Register the collector on the default registry (idempotent). The worker side, which writes the
    snapshots, is rows of :data:`.patches.PATCHES` (the builders below)."""
    global _installed
    if _installed:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(ResidencyCollector(folder))
    _installed = True


# --- replacements for the patch table: the LoRA worker manager's methods that change residency ------------------

def publishing_create_lora_manager(original):
    """``create_lora_manager`` that remembers the served model's name and writes the first (empty) snapshot."""
    def create_lora_manager(self, model, vllm_config):
        result = original(self, model, vllm_config)
        name = getattr(vllm_config.model_config, "served_model_name", None) or vllm_config.model_config.model
        self._flylora_model_name = name[0] if isinstance(name, (list, tuple)) else str(name)
        publish(self)
        return result
    return create_lora_manager


def naming_add_adapter(original):
    """``add_adapter`` that records the adapter's request name (vLLM's LoRAModel has none), then publishes,
    unless it runs inside a step's ``_apply_adapters`` (:func:`publishing_apply_adapters` publishes once
    after all of them)."""
    def add_adapter(self, lora_request):
        _names[lora_request.lora_int_id] = lora_request.lora_name
        try:
            return original(self, lora_request)
        finally:
            if not getattr(self, "_flylora_in_step", False):
                publish(self)
    return add_adapter


def publishing_apply_adapters(original):
    """``_apply_adapters`` (every step: ``add_adapter`` for each adapter the step uses) that publishes once,
    after all of them, instead of once per adapter."""
    def _apply_adapters(self, lora_requests):
        self._flylora_in_step = True
        try:
            return original(self, lora_requests)
        finally:
            self._flylora_in_step = False
            publish(self)
    return _apply_adapters


def publishing_after(original):
    """A residency-changing method (remove, remove all, pin) followed by a publish, also when it raises."""
    def wrapper(self, *args):
        try:
            return original(self, *args)
        finally:
            publish(self)
    wrapper.__name__ = getattr(original, "__name__", "wrapper")
    return wrapper
