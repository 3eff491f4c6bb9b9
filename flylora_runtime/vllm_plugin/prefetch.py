"""Adapter loads off the engine loop: an adapter's first load runs in a background thread of the worker.

On by default on GPU engines, off on CPU engines (:func:`enabled` says why; ``FLYLORA_PREFETCH`` sets it).

Without this, the first request for an adapter makes vLLM's API server call the engine's ``add_lora``; the
engine core passes it to the worker, which reads the checkpoint, validates it and builds its tensors in the
LoRA dtype while every other request waits: the core loop is blocked on that call and the worker runs no
step until it returns (0.1-0.2 s for a rank-32 all-projection adapter of the demo model on this CPU, most
of it the tensor conversion). With its rows of :mod:`.patches` installed:

- **worker** (``LoRAModelRunnerMixin.add_lora``): an adapter the worker does not hold is handed to a
  one-thread pool (:class:`Prefetcher`) that runs vLLM's own ``_load_adapter`` (our checkpoint loader,
  :mod:`.loading`), and ``add_lora`` returns at once; the engine keeps stepping;
- **worker** (``WorkerLoRAManager._load_adapter``): when the scheduler first needs the adapter, the loop
  takes the prefetched model (waiting only for what is left of its load) instead of loading it;
- **API server** (``AsyncLLM.add_lora``): after the engine accepted the request to load, the caller (vLLM's
  adapter resolution, which holds the client's request) polls the worker for the load's outcome
  (``flylora_prefetch_status``, a cheap call between steps) until it is done, and raises the load's error if
  it failed. vLLM then answers that client 400 ("could not be loaded") and the adapter never reaches the
  scheduler: a failing load fails its own requests and never the engine.

The slot images (:mod:`.layers`) are still made in the loop at the adapter's first activation (about a
tenth of a cold load here: 25 ms for all 120 layers of a rank-32 adapter), and adapters evicted from the
CPU cache and requested again are reloaded in the loop as before (the API server does not call
``add_lora`` for names it has resolved already). Prefetched models not yet taken by the loop are bounded
(:data:`MAX_PENDING`, oldest dropped) and dropped when their adapter is removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

logger = logging.getLogger("vllm.flylora.prefetch")

#: Prefetched adapters waiting for the scheduler, at most (the oldest is dropped beyond it).
MAX_PENDING = 64
#: How often the API server asks the worker whether a load finished, and for how long at most.
POLL_S = 0.01
WAIT_S = 600.0
STATUS_METHOD = "flylora_prefetch_status"


class Prefetcher:
    """Loads in one background thread, keyed by vLLM's ``lora_int_id``; thread-safe."""

    def __init__(self, max_pending: int = MAX_PENDING):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flylora-prefetch")
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, Future] = OrderedDict()
        self._failed: OrderedDict[int, str] = OrderedDict()  # outcome of loads dropped after failing
        self.max_pending = max_pending

    def submit(self, lora_id: int, load, name: str = "") -> bool:
        """Start ``load()`` for ``lora_id`` unless one is pending; False if one was."""
        with self._lock:
            if lora_id in self._pending:
                return False
            self._failed.pop(lora_id, None)
            self._pending[lora_id] = self._pool.submit(self._timed, name or str(lora_id), load)
            while len(self._pending) > self.max_pending:
                dropped, fut = self._pending.popitem(last=False)
                fut.cancel()
                logger.warning("prefetched adapter %d dropped before it was scheduled (over %d pending)",
                               dropped, self.max_pending)
            return True

    @staticmethod
    def _timed(name: str, load):
        t0 = time.perf_counter()
        model = load()
        logger.info("adapter %s loaded off the engine loop in %.3f s", name, time.perf_counter() - t0)
        return model

    def take(self, lora_id: int) -> Future | None:
        """The pending load of ``lora_id`` (removed from the pending set), or None."""
        with self._lock:
            return self._pending.pop(lora_id, None)

    def discard(self, lora_id: int) -> None:
        with self._lock:
            fut = self._pending.pop(lora_id, None)
            self._failed.pop(lora_id, None)
        if fut is not None:
            fut.cancel()

    def status(self, lora_id: int) -> str | None:
        """``"loading"``, ``"ready"``, ``"error: <message>"``, or None (not known: loaded in the loop, taken,
        or never submitted). A failed load is dropped when its status is read."""
        with self._lock:
            if lora_id in self._failed:
                return self._failed.pop(lora_id)
            fut = self._pending.get(lora_id)
            if fut is None:
                return None
            if not fut.done():
                return "loading"
            exc = fut.exception() if not fut.cancelled() else RuntimeError("load cancelled")
            if exc is None:
                return "ready"
            del self._pending[lora_id]
            return f"error: {type(exc).__name__}: {exc}"

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_prefetcher: Prefetcher | None = None


def prefetcher() -> Prefetcher:
    global _prefetcher
    if _prefetcher is None:
        _prefetcher = Prefetcher()
    return _prefetcher


def enabled() -> bool:
    """Whether first loads run in the background: ``FLYLORA_PREFETCH=1`` yes, ``0`` no (in the loop, as vLLM
    does); unset: yes on GPU engines, no on CPU engines.

    Why not on CPU: there the engine loop is the CPU. On the 2-vCPU machine of docs/BENCHMARKS.md ("Cold first
    loads"), the background thread took its time from the loop's own OpenMP threads, and two runs of
    ``loadtests.run cold`` measured it worse than loading in the loop on both counts: cold first token p50
    0.48-0.62 s against 0.33-0.35 s, and the other streams' p99 gap between tokens 2.7-3.4x their steady value
    against 1.8-2.1x. On a GPU engine the loop waits on the device and a CPU thread is free.
    """
    value = os.environ.get("FLYLORA_PREFETCH", "").strip()
    if value:
        return value != "0"
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


#: vLLM's own ``WorkerLoRAManager._load_adapter``, kept when its replacement is built (:mod:`.patches`): the
#: background thread runs it, never the replacement (which would wait for its own pending load).
_vllm_load: dict[str, object] = {}


def take_prefetched_load(original):
    """Replacement of ``WorkerLoRAManager._load_adapter``: the loop takes the prefetched model."""
    _vllm_load["load"] = original
    if not enabled():
        return original

    def _load_adapter(self, lora_request):
        pending = prefetcher().take(lora_request.lora_int_id)
        if pending is not None and not pending.cancelled():
            return pending.result()  # the load's own error, if it failed after the API server stopped asking
        return original(self, lora_request)

    return _load_adapter


def prefetching_add_lora(original):
    """Replacement of ``LoRAModelRunnerMixin.add_lora``: hand a new adapter to the background thread."""
    if not enabled():
        return original

    def add_lora(self, lora_request) -> bool:
        manager = getattr(self, "lora_manager", None)
        if manager is None or (lora_request.lora_int_id in manager.list_adapters()
                               and not lora_request.load_inplace):
            return original(self, lora_request)
        if lora_request.load_inplace:
            prefetcher().discard(lora_request.lora_int_id)
        load = _vllm_load["load"]
        prefetcher().submit(lora_request.lora_int_id, lambda: load(manager, lora_request),
                            lora_request.lora_name)
        return True

    return add_lora


def discarding_remove_lora(original):
    """Replacement of ``LoRAModelRunnerMixin.remove_lora``: a removed adapter's pending load is dropped."""
    if not enabled():
        return original

    def remove_lora(self, lora_id: int) -> bool:
        prefetcher().discard(lora_id)
        return original(self, lora_id)

    return remove_lora


def status_method(_absent):
    """``WorkerBase.flylora_prefetch_status`` (added, not replaced): the API server asks it by RPC."""

    def status(self, lora_id: int) -> str | None:
        return prefetcher().status(lora_id)

    return status


def waiting_async_add_lora(original):
    """Replacement of ``AsyncLLM.add_lora`` (API server): wait for the background load's outcome."""
    if not enabled():
        return original

    async def add_lora(self, lora_request) -> bool:
        added = await original(self, lora_request)
        deadline = time.monotonic() + WAIT_S
        while True:
            states = await self.collective_rpc(STATUS_METHOD, args=(lora_request.lora_int_id,))
            state = next((s for s in states if s), None)
            if state is None or state == "ready":
                return added
            if state.startswith("error: "):
                raise RuntimeError(f"adapter {lora_request.lora_name!r} could not be loaded: {state[7:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"adapter {lora_request.lora_name!r} still loading after {WAIT_S:.0f} s")
            await asyncio.sleep(POLL_S)

    return add_lora
