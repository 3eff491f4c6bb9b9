"""Each request's adapter counted as a CPU-cache hit or miss when the worker first schedules it
(``flylora_adapter_requests_total{cache=...}``, :mod:`.metrics`).

A miss: the adapter had to be read from the store for this request, either in the request's first
step (it was not in the CPU cache) or just before, when the API server resolved the adapter for it
(vLLM's ``add_lora`` on first use: such a load is remembered until its first request is scheduled).
A hit: the adapter was in the engine's CPU cache. Requests for the same adapter that arrive while it
loads are hits if their first step comes after the load (they waited, but did not load it again).

Two replacements, installed by :mod:`.patches`: :func:`track_preloaded_adapters`
(``LoRAModelRunnerMixin.add_lora``) and :func:`count_cache_on_schedule` (``GPUModelRunner._update_states``,
which the CPU model runner inherits).
"""

from __future__ import annotations

from flylora_runtime.vllm_plugin.metrics import CACHE_HITS, CACHE_MISSES, count_many


def track_preloaded_adapters(original):
    """``add_lora`` that remembers adapters it loaded that the engine did not hold yet."""

    def add_lora(self, lora_request) -> bool:
        known = lora_request.lora_int_id in self.lora_manager.list_adapters()
        added = original(self, lora_request)
        if added and not known:
            _preloaded(self).add(lora_request.lora_int_id)
        return added

    return add_lora


def count_cache_on_schedule(original):
    """``_update_states`` that counts each newly scheduled request's adapter as a hit or a miss first."""

    def _update_states(self, scheduler_output):
        manager = getattr(self, "lora_manager", None)
        new = [r for r in scheduler_output.scheduled_new_reqs
               if r.lora_request is not None and r.lora_request.lora_int_id > 0 and r.req_id not in self.requests]
        if manager is not None and new:
            held, preloaded = manager.list_adapters(), _preloaded(self)
            hits = misses = 0
            for req in new:
                lora_id = req.lora_request.lora_int_id
                if lora_id in preloaded or lora_id not in held:
                    preloaded.discard(lora_id)
                    misses += 1
                else:
                    hits += 1
            count_many({CACHE_HITS: hits, CACHE_MISSES: misses})
        return original(self, scheduler_output)

    return _update_states


def _preloaded(runner) -> set[int]:
    """Adapter ids loaded by ``add_lora`` whose first request has not been scheduled yet."""
    found = getattr(runner, "_flylora_preloaded", None)
    if found is None:
        found = runner._flylora_preloaded = set()
    return found
