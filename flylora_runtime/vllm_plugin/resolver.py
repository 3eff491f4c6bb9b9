"""Hot-swap plumbing in vLLM's API server: resolve adapters from the store, unload them for real.

- :class:`StoreResolver` (a vLLM ``LoRAResolver``): a request whose ``model`` is an adapter id the engine
  has not seen is looked up as ``<store>/<id>/``; the adapter is validated against the served base model
  in a worker thread (off the API server's event loop, which also warms the page cache for the engine's
  read), then handed to the engine, which loads it into its CPU cache and a device slot on first use.
  Ids must match :data:`ADAPTER_ID_RE`, so a name can never address a path outside the store.
- vLLM's ``/v1/unload_lora_adapter`` only forgets the name (upstream issue #54839): the engine keeps the
  weights in its CPU cache and slot. :func:`unload_frees_engine_copy` (installed by :mod:`.patches`) makes it
  also call ``engine.remove_lora``, so unloading really frees the engine's copy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

from flylora_runtime.format.checkpoint import CONFIG_NAME, validate_dir
from flylora_runtime.format.errors import AdapterError
from flylora_runtime.format.modelspec import BaseModelSpec

logger = logging.getLogger("flylora.resolver")

#: Adapter ids the store resolver accepts: a name is never a path.
ADAPTER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
STORE_ENV = "FLYLORA_ADAPTER_STORE"


class StoreResolver:
    """Resolve ``lora_name`` to ``<store>/<lora_name>/`` after validating it against the base model."""

    def __init__(self, store: str, base: BaseModelSpec | None):
        self.store = os.path.realpath(store)
        self.base = base

    def path_for(self, lora_name: str) -> str | None:
        if not ADAPTER_ID_RE.match(lora_name) or ".." in lora_name:
            return None
        path = os.path.join(self.store, lora_name)
        if os.path.dirname(os.path.realpath(path)) != self.store:
            return None
        return path if os.path.isfile(os.path.join(path, CONFIG_NAME)) else None

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        from vllm.lora.request import LoRARequest

        path = self.path_for(lora_name)
        if path is None:
            return None
        if self.base is not None:
            try:
                await asyncio.to_thread(validate_dir, path, self.base)
            except AdapterError as exc:
                logger.warning("adapter %s in the store is invalid: %s", lora_name, exc)
                return None
        # lora_int_id is replaced by the serving layer with a unique counter value.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=path)


def _base_spec_from_vllm_args() -> BaseModelSpec | None:
    model_dir = os.environ.get("FLYLORA_BASE_MODEL_DIR")
    if model_dir and os.path.isfile(os.path.join(model_dir, "config.json")):
        return BaseModelSpec.from_pretrained(model_dir)
    return None


def install_resolver() -> None:
    """Register :class:`StoreResolver` when ``FLYLORA_ADAPTER_STORE`` names a directory (idempotent)."""
    from vllm.lora.resolver import LoRAResolverRegistry

    store = os.environ.get(STORE_ENV)
    if not store or "FlyLoRA store" in LoRAResolverRegistry.get_supported_resolvers():
        return
    if not os.path.isdir(store):
        raise ValueError(f"{STORE_ENV}={store!r} is not a directory")
    LoRAResolverRegistry.register_resolver("FlyLoRA store", StoreResolver(store, _base_spec_from_vllm_args()))


def unload_frees_engine_copy(original):
    """``OpenAIServingModels.unload_lora_adapter`` that also removes the adapter from the engine."""

    async def unload_lora_adapter(self, request):
        known = self.lora_requests.get(request.lora_name)
        result = await original(self, request)
        if known is not None and isinstance(result, str):
            await self.engine_client.remove_lora(known.lora_int_id)
            logger.info("FlyLoRA: freed adapter %s (int id %d) in the engine", request.lora_name,
                        known.lora_int_id)
        return result

    return unload_lora_adapter
