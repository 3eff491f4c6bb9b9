"""Loading FlyLoRA checkpoints into vLLM's LoRA machinery.

vLLM's ``LoRAModel.from_local_checkpoint`` rejects the ``...lora_topk_bias`` tensors and its
``PEFTHelper`` drops ``top_k``. :func:`load_flylora_checkpoint` (installed by :mod:`.patches`, like every
replacement here) is a class method that:

- refuses pickle files (``adapter_model.bin`` / ``.pt``) and reads only safetensors;
- in a bf16 engine, reads the adapter's engine form when the gateway wrote one at upload
  (:mod:`flylora_runtime.format.engine_form`: the tensors already in bf16, ``B`` transposed; bit for bit the
  values of the checkpoint's path, without its read, conversion and transposing copy);
- also accepts our compact form (``flylora_compact.safetensors``, :mod:`flylora_runtime.weights.compact`);
- splits the routing biases out, checks the remaining module names as vLLM does, and builds the vLLM
  ``LoRAModel`` from the A/B tensors (vLLM folds ``lora_alpha / r`` into B);
- attaches :class:`FlyLoRAInfo` (top_k, routing, d per module) to the ``LoRAModel``.

:func:`activate_with_flylora_weights` wraps ``LoRAModelManager.activate_adapter``: after vLLM has handed A and
B to a slot, the FlyLoRA layers of that slot copy in the adapter's A, B, top-k, d and routing
(:func:`set_slot_weights`; from a slot image kept with the adapter after its first activation, or made at
its load: once every layer has one, all layers are written together, in two C calls; an adapter of a shape
loaded before has no images at all, its write rebased on the first one's: :func:`_prepare_images`). Both count
themselves (``flylora_adapter_loads_total``, ``flylora_adapter_activations_total``, :mod:`.metrics`). A plain
PEFT LoRA adapter (no ``top_k``) is served with ``k = r``, ``d = 0``: exactly LoRA.
:func:`remove_and_release_memory` wraps ``LoRAModelManager.remove_adapter`` (an unload, or an in-place reload)
to hand free heap pages back to the OS (:func:`release_free_memory`); :func:`accept_sparse_init` lets
``PEFTHelper`` accept FlyLoRA's ``init_lora_weights="sparse"``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from flylora_runtime.format.checkpoint import CONFIG_NAME, WEIGHTS_NAME, refuse_pickle
from flylora_runtime.format.config import FlyLoRAConfig
from flylora_runtime.vllm_plugin.metrics import ACTIVATIONS, ENGINE_FORM_LOADS, LOADS, REBASED_LOADS, count
from flylora_runtime.weights.engine_form import read_engine_form

logger = logging.getLogger("vllm.flylora.loading")
COMPACT_NAME = "flylora_compact.safetensors"
BIAS_SUFFIX = ".lora_topk_bias"


@dataclass
class FlyLoRAInfo:
    """What vLLM's LoRAModel lacks: top-k (None: plain LoRA), routing, and d per vLLM module name."""

    top_k: int | None
    routing: str = "signed"
    d: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per vLLM module name: the adapter in that layer's slot layout (FlyLoRALayerMixin.set_flylora_weights),
    # made on the first activation and kept while the adapter is in the engine's CPU cache (it goes with the
    # LoRAModel), so that later activations only copy.
    images: dict = field(default_factory=dict)
    # B already holds lora_alpha / r (read from the engine form): the images can be made as soon as the
    # adapter is loaded (prepare_images_at_load), before vLLM has merged and scaled anything.
    folded: bool = False
    # ``images`` covers every FlyLoRA layer of the engine (a layer it lacks has no weights of this adapter), all
    # on the CPU: an activation then writes them all at once (set_slot_weights, write_slots), with ``write_plan``.
    complete: bool = False
    write_plan: object = None
    # Read from its engine form: (the file's mapping, its checked layout) (FormTensors), what the adapter's whole
    # write is rebased on when another adapter of its layout was loaded before (_prepare_images).
    source: tuple | None = None
    # That write, in place of ``images`` and ``write_plan``: (kernels.adapter_template.AdapterWrite, the names of
    # the layers it writes; the engine's other FlyLoRA layers are cleared).
    whole: tuple | None = None


def read_checkpoint(lora_dir: str, dtype: torch.dtype | None = None,
                    scaling: float | None = None) -> tuple[FlyLoRAConfig, dict[str, torch.Tensor], bool]:
    """The config and the authors'-layout tensors of an adapter directory (authors' or compact form), and
    whether ``B`` already holds the scaling. For a bf16 engine (``dtype``) that scales by ``scaling``, from
    the adapter's engine form when it has a usable one made for that scaling (the tensors are then bf16,
    ``B`` a transposed view with the scaling folded in: the third value is True)."""
    compact = os.path.join(lora_dir, COMPACT_NAME)
    if os.path.isfile(compact):
        from flylora_runtime.weights.compact import CompactAdapter

        adapter = CompactAdapter.load(compact).to_adapter()
        return adapter.config, adapter.state_dict(), False
    found = read_engine_form(lora_dir) if dtype == torch.bfloat16 and scaling is not None else None
    if found is not None and found[1] != scaling:
        logger.warning("engine form of %s not used: made for scaling %r, the engine scales by %r; loading its "
                       "checkpoint", lora_dir, found[1], scaling)
        found = None
    if found is not None:
        with open(os.path.join(lora_dir, CONFIG_NAME), "rb") as fh:
            config = FlyLoRAConfig.from_json_bytes(fh.read())
        count(ENGINE_FORM_LOADS)
        return config, found[0], True
    weights = os.path.join(lora_dir, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        for suffix in (".bin", ".pt"):
            pickled = os.path.join(lora_dir, "adapter_model" + suffix)
            if os.path.exists(pickled):
                refuse_pickle(pickled)
        raise FileNotFoundError(f"{lora_dir} has no {WEIGHTS_NAME} or {COMPACT_NAME}")
    refuse_pickle(weights)
    with open(os.path.join(lora_dir, CONFIG_NAME), "rb") as fh:
        config = FlyLoRAConfig.from_json_bytes(fh.read())
    return config, load_file(weights), False


#: ``(vLLM module name, is lora_A)`` by (tensor name, the weights mapper's fingerprint): every adapter of a model
#: has the same tensor names, and parsing them (a few string operations and the mapper's rules for each of a full
#: adapter's 840 names) was ~3 ms of a cold load in the engine loop. The fingerprint is the mapper's ``repr``
#: (a dataclass of its rules), not its ``id``: vLLM makes a new mapper object for every load
#: (``get_rename_mapper``), so a cache keyed by ``id`` missed every time. Bounded; cleared when full.
_MODULE_NAMES: dict[tuple[str, str], tuple[str, bool]] = {}
_MAX_MODULE_NAMES = 1 << 16


def mapper_fingerprint(weights_mapper) -> str:
    """What :func:`_module_name` keys a mapper's names by: its rules (``repr`` of the dataclass), or ``"None"``."""
    return repr(weights_mapper)


def _parsed_name(key: str, weights_mapper, fingerprint: str | None = None) -> tuple[str, bool]:
    """vLLM's ``parse_fine_tuned_lora_name(key, weights_mapper)``, cached; ``fingerprint`` is
    :func:`mapper_fingerprint` of the mapper (computed here when not given)."""
    cache_key = (key, mapper_fingerprint(weights_mapper) if fingerprint is None else fingerprint)
    found = _MODULE_NAMES.get(cache_key)
    if found is not None:
        return found
    from vllm.lora.utils import parse_fine_tuned_lora_name

    name, is_a = parse_fine_tuned_lora_name(key, weights_mapper)  # raises for a name the mapper drops: not cached
    if len(_MODULE_NAMES) >= _MAX_MODULE_NAMES:
        _MODULE_NAMES.clear()
    _MODULE_NAMES[cache_key] = found = (name, bool(is_a))
    return found


def _module_name(key: str, weights_mapper, fingerprint: str | None = None) -> str:
    return _parsed_name(key, weights_mapper, fingerprint)[0]


def _lora_model(cls, lora_model_id: int, tensors: dict[str, torch.Tensor], peft_helper, device, dtype,
                weights_mapper, fingerprint: str):
    """vLLM's ``LoRAModel.from_lora_tensors`` for what a FlyLoRA or plain LoRA checkpoint holds here (lora_A and
    lora_B of linear modules, no rank or alpha patterns, no modules to save, no embedding or skipped names),
    with each tensor name parsed once per model (:func:`_parsed_name`) instead of twice per load: the same
    ``LoRAModel``. Anything else goes to vLLM's own."""
    from vllm.lora.lora_model import is_base_embedding_weights
    from vllm.lora.lora_weights import LoRALayerWeights
    from vllm.utils.torch_utils import PIN_MEMORY

    if (peft_helper.rank_pattern or peft_helper.alpha_pattern or peft_helper.modules_to_save
            or any("lora_embedding" in k or is_base_embedding_weights(k) for k in tensors)):
        return None
    pin = str(device) == "cpu" and PIN_MEMORY
    loras: dict[str, LoRALayerWeights] = {}
    for key, tensor in tensors.items():
        name, is_a = _parsed_name(key, weights_mapper, fingerprint)
        lora = loras.get(name)
        if lora is None:
            loras[name] = lora = LoRALayerWeights.from_config(name, peft_helper)
        t = tensor.to(device=device, dtype=dtype)
        if pin:
            t = t.pin_memory()
        if is_a:
            lora.lora_a = t
        else:
            lora.lora_b = t
    return cls(lora_model_id, peft_helper.r, loras, modules_to_save={})


def load_flylora_checkpoint(original):
    """The replacement of ``LoRAModel.from_local_checkpoint`` (see the module docstring; vLLM's own, the
    ``original``, is not called)."""
    from vllm.lora.utils import get_lora_id

    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, *, lora_model_id=None,
                              device="cuda", dtype=None, model_vocab_size=None, weights_mapper=None,
                              skip_prefixes=None, moe_ep_spec=None):
        scaling = None if peft_helper.rank_pattern or peft_helper.alpha_pattern else peft_helper.vllm_lora_scaling_factor
        config, tensors, folded = read_checkpoint(lora_dir, dtype, scaling)
        fingerprint = mapper_fingerprint(weights_mapper)
        d: dict[str, torch.Tensor] = {}
        for key in [k for k in tensors if k.endswith(BIAS_SUFFIX)]:
            a_key = key[: -len(BIAS_SUFFIX)] + ".lora_A.weight"
            d[_module_name(a_key, weights_mapper, fingerprint)] = tensors.pop(key).to(torch.float32)
        unexpected = sorted({
            m for m in (_module_name(k, weights_mapper, fingerprint) for k in tensors)
            if m.rsplit(".", 1)[-1] not in expected_lora_modules
        })
        if unexpected:
            raise ValueError(f"While loading {lora_dir}, expected target modules in "
                             f"{sorted(expected_lora_modules)} but received {unexpected}.")
        if peft_helper.r != config.r:
            raise ValueError(f"While loading {lora_dir}: config r={config.r} but vLLM read r={peft_helper.r}")
        lora_model_id = get_lora_id() if lora_model_id is None else lora_model_id
        model = None if skip_prefixes else _lora_model(cls, lora_model_id, tensors, peft_helper, device, dtype,
                                                       weights_mapper, fingerprint)
        if model is None:
            model = cls.from_lora_tensors(
                lora_model_id=lora_model_id, tensors=tensors, peft_helper=peft_helper, device=device, dtype=dtype,
                model_vocab_size=model_vocab_size, weights_mapper=weights_mapper, skip_prefixes=skip_prefixes)
        if folded:  # B holds the scaling already (the engine form): vLLM's in-place scaling must not run again
            for lora in model.loras.values():
                lora.scaling = 1
        mapping = getattr(tensors, "mapping", None)
        model.flylora = FlyLoRAInfo(top_k=config.top_k if config.is_flylora else None, routing=config.routing, d=d,
                                    folded=folded, source=None if mapping is None else (mapping, tensors.layout))
        count(LOADS)
        return model

    return classmethod(from_local_checkpoint)


def activate_with_flylora_weights(original):
    """``LoRAModelManager.activate_adapter`` that, once vLLM has placed the adapter in a slot, copies its
    FlyLoRA weights into that slot of every FlyLoRA layer (:func:`set_slot_weights`) and counts it."""

    def activate_adapter(self, lora_id: int) -> bool:
        placed = original(self, lora_id)
        if placed:
            set_slot_weights(self, lora_id)
            if getattr(self._registered_adapters[lora_id], "flylora", None) is not None:
                count(ACTIVATIONS)  # a real adapter (vLLM's warm-up dummies are not counted)
        return placed

    return activate_adapter


def accept_sparse_init(original):
    """``PEFTHelper._init_is_supported`` that also accepts ``init_lora_weights="sparse"``."""

    def _init_is_supported(self) -> bool:
        # FlyLoRA's "sparse" init only sets the frozen A at training time; it leaves the base weights alone.
        init = self.init_lora_weights
        return (isinstance(init, str) and init.lower() == "sparse") or original(self)

    return _init_is_supported


def remove_and_release_memory(original):
    """``LoRAModelManager.remove_adapter`` that hands free heap pages back after a removal
    (:func:`release_free_memory`)."""

    def remove_adapter(self, adapter_id: int) -> bool:
        removed = original(self, adapter_id)
        if removed:
            release_free_memory()
        return removed

    return remove_adapter


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Called when an adapter is unloaded. Its tensors (and the slot images made at its activations, small
    and long-lived) sit in the heap between others' allocations, so glibc keeps the pages: without this, the
    engine's RSS stayed ~10% above its level before 50 full-size adapters came and went (the hot-swap test's
    check), with it 1.0x. Evictions from vLLM's CPU cache (``remove_oldest_adapter``) do not call it: they
    come with every cache miss under many-adapter load, a trim costs 10-120 ms (a 1.6 GB heap with half of
    it free), and the next adapter of the same shape reuses the freed chunks anyway.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _slice_names(manager, module_name: str, module) -> list[str]:
    """The vLLM module names of a layer's slices (a packed layer's sub-modules), one per slice."""
    names = manager.packed_modules.get(module_name, [module_name])
    if len(names) != module.flylora_slots.num_slices:
        # A packed group that vLLM expanded (e.g. one A for several slices): d is per group.
        names = (names * module.flylora_slots.num_slices)[: module.flylora_slots.num_slices]
    return names


def set_slot_weights(manager, lora_id: int) -> None:
    """Copy adapter ``lora_id`` into its slot of every FlyLoRA layer: A and B (which vLLM has just handed to the
    layers), top-k, d and routing."""
    from flylora_runtime.vllm_plugin.layers import FlyLoRALayerMixin

    index = manager.lora_index_to_id.index(lora_id)
    lora_model = manager._registered_adapters[lora_id]
    info: FlyLoRAInfo | None = getattr(lora_model, "flylora", None)
    if info is None:
        info = FlyLoRAInfo(top_k=None)
    elif info.complete:
        _write_all(manager, index, info)
        return
    on_cpu = True
    for module_name, module in manager.modules.items():
        if not isinstance(module, FlyLoRALayerMixin):
            continue
        names = _slice_names(manager, module_name, module)
        image = module.set_flylora_weights(index, [info.d.get(n) for n in names], info.top_k,
                                           info.routing == "magnitude", image=info.images.get(module_name))
        if module.flylora_slots.device.type != "cpu":
            on_cpu = False
        elif image is not None:
            # Off the CPU an image is a device copy of the adapter (dense A, B): kept for every adapter in
            # the CPU cache it would fill the GPU past what the engine sized. Dense A needs no compaction, so
            # making it again at the next activation costs only the copy the image would have saved.
            info.images[module_name] = image
    info.complete = on_cpu and getattr(lora_model, "flylora", None) is info


def _write_all(manager, index: int, info: FlyLoRAInfo) -> None:
    """:func:`set_slot_weights` for an adapter with an image for every layer it has weights in
    (:attr:`FlyLoRAInfo.complete`): layers it lacks are cleared and the rest written into slot ``index`` in two
    C calls for the whole model (:func:`~flylora_runtime.kernels.write_slots`; its plan kept on ``info`` for the
    adapter's next activation), instead of one write per layer. The same slot contents."""
    from flylora_runtime.kernels import write_slots
    from flylora_runtime.vllm_plugin.layers import FlyLoRALayerMixin

    if info.whole is not None:  # rebased from its shape's template (_prepare_images)
        write, weighted = info.whole
        for module_name, module in manager.modules.items():
            if isinstance(module, FlyLoRALayerMixin):
                module._flylora_pending.pop(index, None)
                if module_name in weighted:
                    module._flylora_weighted.add(index)
                else:
                    module._flylora_clear(index)
        write.write(index)
        return
    pairs = []
    for module_name, module in manager.modules.items():
        if not isinstance(module, FlyLoRALayerMixin):
            continue
        module._flylora_pending.pop(index, None)  # vLLM's set_lora of this activation: the image has it all
        image = info.images.get(module_name)
        if image is None:
            module._flylora_clear(index)  # the adapter has no weights in this layer
        else:
            pairs.append((module.flylora_slots, image))
            module._flylora_weighted.add(index)
    plan = info.write_plan
    info.write_plan = write_slots(pairs, index, plan if plan is not None and plan.matches(pairs) else None)


#: Templates kept per engine (AdapterTemplate by engine-form layout, top-k and routing; oldest dropped): one per
#: adapter shape in use. Each holds its layout, so the ``id`` it is keyed by is not reused while it is kept.
_MAX_TEMPLATES = 16
_TEMPLATES_LOCK = threading.Lock()


def prepare_images_at_load(original):
    """``WorkerLoRAManager._load_adapter`` that, for an adapter read from its engine form (B already scaled:
    :attr:`FlyLoRAInfo.folded`) on a CPU engine, also makes its slot images for every FlyLoRA layer, so that
    its first activation (in the engine loop) only copies them, as every later one does. With the background
    loads of :mod:`.prefetch` this runs in the load's thread, off the loop. The images are the ones
    :meth:`~.layers.FlyLoRALayerMixin.set_flylora_weights` would make at the activation: from the same A and
    B (vLLM's merge only lists a packed layer's sub-modules; the engine form's B needs no scaling)."""

    def _load_adapter(self, lora_request):
        model = original(self, lora_request)
        info = getattr(model, "flylora", None)
        if info is not None and info.folded:
            _prepare_images(self._adapter_manager, model, info)
        return model

    return _load_adapter


def _prepare_images(manager, model, info: FlyLoRAInfo) -> None:
    """The images of every CPU FlyLoRA layer the adapter has weights in, made together
    (:func:`~flylora_runtime.kernels.prepare_slots`: one count pass for the whole adapter); ``info.complete``
    when every FlyLoRA layer is on the CPU.

    For an adapter read from its engine form, the first of its layout, top-k and routing in this engine also
    leaves the :class:`~flylora_runtime.kernels.adapter_template.AdapterTemplate` of its write (its plan, made now,
    relative to its file), and every later one gets that template rebased on its own file instead of images
    (``info.whole``): its A counted in one C call and two tables shifted, the same slot contents (a cold full
    adapter offline, ``python -m flylora_runtime.bench.load``: images and first write 11.4 -> 4.5 ms)."""
    from flylora_runtime.kernels import plan_writes, prepare_slots
    from flylora_runtime.kernels.adapter_template import AdapterTemplate
    from flylora_runtime.vllm_plugin.layers import PACK_AT_WRITE, FlyLoRALayerMixin

    if any(lora.scaling != 1 for lora in model.loras.values()):
        return  # not folded after all: the activation makes them from vLLM's scaled B
    key = found = None
    if info.source is not None and PACK_AT_WRITE:
        key = (id(info.source[1]), info.top_k, info.routing)
        with _TEMPLATES_LOCK:  # loads may run in the prefetch thread as well as in the loop
            found = manager.__dict__.setdefault("_flylora_templates", {}).get(key)
    if found is not None and found[0] is info.source[1]:
        info.whole = (found[1].instantiate(info.source[0]), found[2])
        info.complete = True
        count(REBASED_LOADS)
        return
    jobs, names_of, complete = [], [], True
    for module_name, module in manager.modules.items():
        if not isinstance(module, FlyLoRALayerMixin):
            continue
        if module.flylora_slots.device.type != "cpu":
            complete = False
            continue
        names = manager.packed_modules.get(module_name)
        loras = [model.loras.get(n) for n in names] if names else [model.loras.get(module_name)]
        if all(lora is None for lora in loras):
            continue
        lora_a = [None if lora is None else lora.lora_a for lora in loras]
        lora_b = [None if lora is None else lora.lora_b for lora in loras]
        if not names:  # vLLM hands a single layer its tensors, not lists
            lora_a, lora_b = lora_a[0], lora_b[0]
        names = _slice_names(manager, module_name, module)
        per_slice = module.flylora_slice_adapters(lora_a, lora_b, [info.d.get(n) for n in names], info.top_k,
                                                  info.routing == "magnitude")
        if per_slice is not None:
            jobs.append((module.flylora_slots, per_slice))
            names_of.append(module_name)
    # Finite by construction (validated at upload; the engine form's values are checked as it is read).
    for module_name, image in zip(names_of, prepare_slots(jobs, check_finite=False, pack_at_write=PACK_AT_WRITE)):
        info.images[module_name] = image
    info.complete = complete
    if complete and key is not None and jobs:
        # The first adapter of its layout, top-k and routing here: its write plan now (its first activation uses
        # it), and the template the next ones are rebased on (no images of their own).
        plan = plan_writes([(slots, info.images[name]) for (slots, _), name in zip(jobs, names_of)])
        info.write_plan = plan
        template = None if plan is None else AdapterTemplate.from_plan(plan, info.source[0])
        if template is not None:
            with _TEMPLATES_LOCK:
                templates = manager._flylora_templates
                while len(templates) >= _MAX_TEMPLATES:
                    templates.pop(next(iter(templates)))
                templates[key] = (info.source[1], template, frozenset(names_of))
