"""FlyLoRA layers for vLLM: subclasses of vLLM's linear LoRA layers that apply the FlyLoRA delta.

vLLM keeps its LoRA layer classes in ``vllm.lora.utils._all_lora_classes`` and picks, for every linear
layer of the model, the first class whose ``can_replace_layer`` accepts it. :func:`flylora_classes` (installed
by :mod:`.patches`) replaces each linear entry with a subclass (same order) that mixes in
:class:`FlyLoRALayerMixin`:

- the adapter slots live in one :class:`~flylora_runtime.kernels.FlyLoRASlots` per layer (A packed
  compact on CPU when the compiled kernel is available, in fp32 or, in bf16 engines, bf16; dense fp32
  otherwise; ``B^T`` with
  ``lora_alpha / r`` folded in, d, k, r and the routing flag per slot and slice);
- ``set_lora`` (called by vLLM) notes an adapter's A and B for a slot;
  :meth:`FlyLoRALayerMixin.set_flylora_weights` (called right after by the model manager hook in
  :mod:`.loading`, in the engine's loop, before any forward uses the slot) copies A, B, d, top-k and
  routing into the slot (:func:`~flylora_runtime.kernels.prepare_slot` on the adapter's first activation,
  then :func:`~flylora_runtime.kernels.write_slot` of the image the adapter keeps while it stays loaded);
- the forward adds :func:`~flylora_runtime.kernels.flylora_apply` (the batched kernel: CPU compiled C or grouped torch,
  or Triton on GPU) to the base output. Rows with no adapter (slot -1) get exactly zero delta, and ranks
  past an adapter's own r are never selected.

vLLM's own ``lora_a_stacked`` / ``lora_b_stacked`` are kept only as zero-stride views of their original
shape and dtype (vLLM reads those to size warm-up adapters); they hold no memory and are never used.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from flylora_runtime.kernels import (FlyLoRASlots, SlotImage, allocate_slots, check_inputs, clear_slot, get_backend,
                                     native, prepare_slot, write_slot)
from flylora_runtime.reference.ops import LayerAdapter


class FlyLoRAUnsupported(RuntimeError):
    """An engine configuration the FlyLoRA layers cannot serve exactly (refused at start-up)."""


def _zero_view(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


#: Images (SlotImage) keep A as the adapter holds it and pack it into the slot at every activation, instead
#: of a packed copy made once (``FLYLORA_PACK_AT_WRITE=0``: the packed copy, as before).
PACK_AT_WRITE = os.environ.get("FLYLORA_PACK_AT_WRITE", "1").strip().lower() not in ("0", "false", "no", "off")


def _a_layout(device, in_features: int, lora_dtype: torch.dtype) -> dict:
    """How the slots store A. On CPU with the compiled kernel: packed compact (16-bit column indices when
    they fit, and per-row column bitmasks), room for dense rows (``max_nnz = in``) so plain LoRA loads too;
    the kernel reads only an adapter's real nonzeros, contiguously: a quarter of the values for the
    authors' sparse A (measured 26 vs 43 ms per 16-adapter decode step against dense fp32). The values are
    fp32, or bf16 in a bf16 engine: vLLM's own LoRA holds A in the engine's dtype too, x is already bf16
    there, and at decode the A stream is most of the kernel's memory traffic (bf16 values: 0.79x the
    kernel time of a 16-adapter decode step). An fp32 engine keeps fp32 A, exact against the reference.
    Elsewhere (a GPU, no compiler, or another backend forced with ``FLYLORA_KERNEL_BACKEND``, e.g. the
    Triton backend under ``TRITON_INTERPRET=1`` on CPU): dense fp32."""
    on_cpu_backend = os.environ.get("FLYLORA_KERNEL_BACKEND", "cpu") == "cpu"
    if torch.device(device).type != "cpu" or not on_cpu_backend or native.library() is None:
        return {"a_dtype": torch.float32}
    return {"max_nnz": in_features, "packed": True,
            "index_dtype": torch.int16 if in_features <= 32767 else torch.int32,
            "a_dtype": torch.bfloat16 if lora_dtype == torch.bfloat16 else torch.float32}


_backend_logged = False


def _log_backend_once(backend, slots: FlyLoRASlots) -> None:
    """Name the kernel backend and A layout in the engine's log, once per process (under vLLM's logger
    namespace, which vLLM prints at INFO)."""
    global _backend_logged
    if _backend_logged:
        return
    _backend_logged = True
    name = getattr(getattr(backend, "func", backend), "__name__", str(backend))
    layout = "dense" if slots.a_idx is None else ("packed compact" if slots.a_packed else "compact")
    logging.getLogger("vllm.flylora").info("FlyLoRA kernel backend: %s on %s, A %s %s, %d slots", name,
                                           slots.device, layout, str(slots.a_val.dtype).removeprefix("torch."),
                                           slots.num_slots)


def _bind_static_buffers(backend, slots: FlyLoRASlots):
    """The Triton backend with the layer's slice table built once: built per call it is a host-to-device
    copy, which a CUDA graph cannot capture (its top-k workspaces are allocated per call, which can)."""
    if getattr(backend, "__name__", "") != "apply_triton":
        return backend
    from flylora_runtime.kernels.triton_kernels import slice_table

    return functools.partial(backend, slice_meta=slice_table(slots))


class FlyLoRALayerMixin:
    """Mixed in front of a vLLM ``BaseLinearLayerWithLoRA`` subclass (see the module docstring)."""

    flylora_slots: FlyLoRASlots

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        if self.tp_size > 1:
            raise FlyLoRAUnsupported(
                "FlyLoRA does not support tensor parallelism > 1 yet: its top-k must be taken after the "
                "all-reduce of the shrink output. Start the engine with --tensor-parallel-size 1.")
        if lora_config.fully_sharded_loras:
            raise FlyLoRAUnsupported("FlyLoRA does not support --fully-sharded-loras; leave it off.")
        super().create_lora_weights(max_loras, lora_config, model_config)
        self.lora_a_stacked = tuple(_zero_view(t) for t in self.lora_a_stacked)
        self.lora_b_stacked = tuple(_zero_view(t) for t in self.lora_b_stacked)
        self.flylora_slots = allocate_slots(
            max_loras, lora_config.max_lora_rank, self.input_size, self.output_slices,
            b_dtype=lora_config.lora_dtype, device=self.device,
            **_a_layout(self.device, self.input_size, lora_config.lora_dtype))
        # Resolved once: the per-call dispatch (environment lookup, argument checks) is measurable at
        # 120 layer calls per decode step. The first call is checked in full (see _apply_lora_to_output).
        self._flylora_backend = _bind_static_buffers(get_backend(self.device), self.flylora_slots)
        _log_backend_once(self._flylora_backend, self.flylora_slots)
        self._flylora_checked = False
        self._flylora_pending: dict[int, tuple[list, list]] = {}
        self._flylora_weighted: set[int] = set()  # slots holding weights for at least one slice here

    def _flylora_clear(self, index: int) -> None:
        self._flylora_weighted.discard(index)
        clear_slot(self.flylora_slots, index)  # a no-op on a slot already empty

    def reset_lora(self, index: int) -> None:
        self._flylora_pending.pop(index, None)
        self._flylora_clear(index)

    def _slices(self, lora_a, lora_b) -> tuple[list, list]:
        if isinstance(lora_a, torch.Tensor) or lora_a is None:
            lora_a, lora_b = [lora_a], [lora_b]
        lora_a, lora_b = list(lora_a), list(lora_b)
        if len(lora_b) != self.n_slices and hasattr(self, "expand_packed_lora"):
            lora_a, lora_b = self.expand_packed_lora(lora_a, lora_b)
        if len(lora_a) != self.n_slices or len(lora_b) != self.n_slices:
            raise ValueError(f"{type(self).__name__}: expected {self.n_slices} slices, got "
                             f"{len(lora_a)} A and {len(lora_b)} B tensors")
        return lora_a, lora_b

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        """Remember slot ``index``'s A and B (``lora_b`` already holds alpha/r) until its routing is set.

        vLLM calls this from ``activate_adapter``; the FlyLoRA hook (:func:`.loading.set_slot_weights`) then
        calls :meth:`set_flylora_weights` for the same slot, which copies everything into the slot at once.
        """
        self._flylora_pending[index] = self._slices(lora_a, lora_b)

    def set_flylora_weights(self, index: int, d: list[torch.Tensor | None], top_k: int | None,
                            magnitude: bool, image: SlotImage | None = None) -> SlotImage | None:
        """Copy slot ``index``'s adapter in: A and B (from :meth:`set_lora`), per-slice bias ``d[i]`` (None:
        zeros), ``top_k`` (None: r) and the routing (``magnitude``).

        A slice the adapter does not target gets a zero rank-1 entry (it contributes nothing); a layer none of
        whose slices it targets is cleared instead (an empty slot, skipped by the kernels).

        Returns the adapter's :class:`~flylora_runtime.kernels.SlotImage` for this layer (None when the layer
        was cleared). The caller keeps it while the adapter stays loaded and passes it back as ``image`` on
        the adapter's next activation, which then copies B and the routing and packs A straight into the slot
        (:data:`PACK_AT_WRITE`, the default), or only copies (a packed image: about a seventh of the time of
        making one). ``image`` must come from this layer and the same adapter.
        """
        slots = self.flylora_slots
        lora_a, lora_b = self._flylora_pending.pop(index, ([None] * slots.num_slices, [None] * slots.num_slices))
        if image is None:
            image = self.prepare_flylora_image(lora_a, lora_b, d, top_k, magnitude)
            if image is None:
                # The adapter has no weights in this layer (a q/v adapter's o, gate_up and down layers): an
                # empty slot (k = 0 everywhere) contributes exactly nothing, and clearing it takes a tenth of
                # the time of loading zero rank-1 entries into every slice (~0.05 against ~0.5 ms per layer).
                self._flylora_clear(index)
                return None
        write_slot(slots, index, image)
        self._flylora_weighted.add(index)  # at least one slice has weights (else cleared above)
        return image

    def prepare_flylora_image(self, lora_a, lora_b, d: list[torch.Tensor | None], top_k: int | None,
                              magnitude: bool) -> SlotImage | None:
        """An adapter's :class:`~flylora_runtime.kernels.SlotImage` for this layer from the A and B vLLM hands
        to :meth:`set_lora` (a tensor or a list per slice; ``lora_b`` already holds alpha/r), the per-slice
        biases ``d``, ``top_k`` and the routing; None when none of the layer's slices has weights. Writes
        nothing (it runs off the engine loop too: :func:`.loading.prepare_images_at_load`)."""
        per_slice = self.flylora_slice_adapters(lora_a, lora_b, d, top_k, magnitude)
        if per_slice is None:
            return None
        # Finite by construction: the checkpoint validator refuses non-finite tensors before anything is
        # stored. A is packed straight into the slot at each write (SlotImage, pack_at_write): no packed copy
        # of it is made or kept.
        return prepare_slot(self.flylora_slots, per_slice, check_finite=False, pack_at_write=PACK_AT_WRITE)

    def flylora_slice_adapters(self, lora_a, lora_b, d: list[torch.Tensor | None], top_k: int | None,
                               magnitude: bool) -> list[LayerAdapter] | None:
        """What :meth:`prepare_flylora_image` makes its image of: one LayerAdapter per slice (a zero rank-1 one
        for a slice without weights), or None when none of the layer's slices has weights."""
        slots = self.flylora_slots
        lora_a, lora_b = self._slices(lora_a, lora_b)
        if len(d) != slots.num_slices:
            raise ValueError(f"expected {slots.num_slices} routing biases, got {len(d)}")
        if all(a is None or b is None for a, b in zip(lora_a, lora_b)):
            return None
        routing = "magnitude" if magnitude else "signed"
        per_slice = []
        for i, (a, b, d_i) in enumerate(zip(lora_a, lora_b, d)):
            if a is None or b is None:
                out_i = slots.output_slices[i]
                # B in the slots' dtype: written by the compiled copy like a real slice's (no torch conversion)
                per_slice.append(LayerAdapter(A=torch.zeros(1, slots.in_features),
                                              B=torch.zeros(out_i, 1, dtype=slots.b.dtype, device=slots.device),
                                              d=torch.zeros(1), top_k=1, scaling=1.0, routing=routing))
                continue
            r = a.shape[0]
            k = r if top_k is None else min(top_k, r)
            per_slice.append(LayerAdapter(A=a, B=b, d=torch.zeros(r) if d_i is None else d_i, top_k=k,
                                          scaling=1.0, routing=routing))
        return per_slice

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        active = getattr(self.punica_wrapper, "flylora_active_slots", None)
        if active is not None and x.device.type == "cpu" and not (active & self._flylora_weighted):
            # No token of this step uses an adapter with weights in this layer (base-only batches, or
            # adapters that do not target it): the delta is exactly zero, skip the kernel call.
            return output
        original_shape = output.shape if output.ndim == 3 else None
        if x.ndim == 3 and output.ndim == 3:
            output = output.flatten(0, 1)
            x = x.flatten(0, 1)
        # -1 marks a token with no adapter; the buffer is sized for the largest batch.
        token_slot = self.punica_wrapper._token_lora_indices[: x.shape[0]]
        if not self._flylora_checked or x.stride(-1) != 1 or output.stride(-1) != 1:
            # In full once (shapes, dtypes, device); after that only the layout can change between calls.
            check_inputs(output, x, token_slot, self.flylora_slots, check_indices=False)
            self._flylora_checked = True
        self._flylora_backend(output, x, token_slot, self.flylora_slots)
        if original_shape is not None:
            output = output.reshape(original_shape)
        return output

    def _apply_async_impl(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # vLLM's dual-stream path calls the punica ops directly; FlyLoRA goes through its own kernel.
        return self._apply_sync(x, bias)


def flylora_classes(base_classes: tuple[type, ...]) -> tuple[type, ...]:
    """``base_classes`` with every non-sharded linear LoRA class replaced by its FlyLoRA subclass."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    out = []
    for cls in base_classes:
        if (isinstance(cls, type) and issubclass(cls, BaseLinearLayerWithLoRA)
                and not issubclass(cls, FlyLoRALayerMixin) and "Sharded" not in cls.__name__):
            cls = type("FlyLoRA" + cls.__name__, (FlyLoRALayerMixin, cls), {"__module__": __name__})
        out.append(cls)
    return tuple(out)


def note_active_slots(original):
    """``PunicaWrapperBase.update_metadata`` that also notes, on the host, which slots the step's tokens use
    (``flylora_active_slots``, read by :meth:`FlyLoRALayerMixin._apply_lora_to_output`). Installed by
    :mod:`.patches`."""

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        original(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        slot_of = {lora_id: i for i, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
        self.flylora_active_slots = frozenset(slot_of[i] for i in set(mapping.index_mapping) if i > 0 and i in slot_of)

    return update_metadata
