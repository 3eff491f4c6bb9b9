"""Adapter load counters of the engine, exported on vLLM's own ``/metrics``.

- ``flylora_adapter_loads_total``: adapters read from the adapter store into the engine's CPU cache: the
  first use of an adapter on this engine, and every reload after the LRU cache (``--max-cpu-loras``)
  evicted it. Each is a cache miss; every other request for an adapter finds it in memory.
- ``flylora_adapter_loads_engine_form_total``: of those, the loads that read the adapter's engine form (its
  tensors already in a bf16 engine's layout, written by the gateway at upload:
  :mod:`flylora_runtime.format.engine_form`) instead of converting its checkpoint.
- ``flylora_adapter_loads_rebased_total``: of those, the loads written by rebasing the write of an earlier adapter
  of the same shape (:mod:`flylora_runtime.kernels.adapter_template`), with no slot images of their own.
- ``flylora_adapter_activations_total``: adapters copied from the CPU cache into a device slot
  (``--max-loras``): slot misses.
- ``flylora_adapter_requests_total{cache="hit"|"miss"}``: requests for an adapter, by whether the engine
  held the adapter in its CPU cache when it first scheduled the request (a miss had to read it from the
  store; see :mod:`.cache_counting`).

Beside them, :mod:`.residency` exports which adapters are resident, per tier (``vllm:lora_adapter_loaded``).

All five are counted where vLLM's LoRA manager lives, the worker (its own process ``VLLM::Worker`` on
CPU, or inside the engine-core process), while ``/metrics`` is served by the API-server process from
prometheus_client's default registry (vLLM switches to prometheus' multiprocess mode only with several API
servers, which ``flylora-engine`` does not start). So the worker keeps its counts in a small JSON file,
``counts-<pid>.json`` (rewritten, then renamed, after every event by a writer thread, so that no load,
activation or scheduler step waits for the file system: that was 0.3-1 ms per event in the engine loop,
three times per cold load; :func:`flush` waits for it), in a folder shared with its API server, and the API server registers
:class:`EngineCountersCollector`, which adds those files up at every scrape. The folder
is ``$FLYLORA_ENGINE_METRICS_DIR``; the first process that loads the plugin (the API server) creates a
fresh one when it is unset and exports it to the processes it starts. ``flylora-engine`` unsets it, so
two engines started from one shell never share counts. Counts start at zero with every engine start.
"""

from __future__ import annotations

import atexit
import glob
import json
import logging
import os
import shutil
import tempfile
import threading

logger = logging.getLogger("flylora.metrics")

METRICS_DIR_ENV = "FLYLORA_ENGINE_METRICS_DIR"
LOADS = "flylora_adapter_loads"
ACTIVATIONS = "flylora_adapter_activations"
ENGINE_FORM_LOADS = "flylora_adapter_loads_engine_form"
REBASED_LOADS = "flylora_adapter_loads_rebased"
CACHE_HITS = "flylora_adapter_requests:hit"
CACHE_MISSES = "flylora_adapter_requests:miss"
#: counter key (name without ``_total``, then ``:`` and the ``cache`` label if any) -> help text
COUNTERS = {
    LOADS: "Adapters read from the adapter store into the engine's CPU cache (cache misses: first use on this "
           "engine, or a reload after LRU eviction).",
    ENGINE_FORM_LOADS: "Of the loads, those read from the adapter's engine form (bf16, written by the gateway at "
                       "upload) instead of its checkpoint.",
    REBASED_LOADS: "Of the engine-form loads, those written by rebasing an earlier adapter of the same shape's write "
                   "(no slot images of their own).",
    ACTIVATIONS: "Adapters copied from the engine's CPU cache into a device slot (slot misses).",
    CACHE_HITS: "Requests for an adapter, by whether the engine held it in its CPU cache when it first scheduled "
                "the request (miss: read from the store for it).",
    CACHE_MISSES: "",
}

_lock = threading.Lock()
_pending = threading.Condition(_lock)  # the writer waits on it for new counts
_published = threading.Condition(_lock)  # flush() waits on it for the writer
_counts: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)
_version = 0  # events counted in this process
_written = 0  # events in the last file written
_writer: threading.Thread | None = None
_write_failed = False
_collector_installed = False


def _after_fork_in_child() -> None:
    """A forked child has no writer thread (and maybe a lock held by a thread that does not exist there)."""
    global _lock, _pending, _published, _writer
    _lock = threading.Lock()
    _pending, _published = threading.Condition(_lock), threading.Condition(_lock)
    _writer = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def metrics_dir() -> str:
    """The folder shared by this engine's processes (created and exported when unset)."""
    path = os.environ.get(METRICS_DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="flylora-engine-metrics-")
        os.environ[METRICS_DIR_ENV] = path
        creator = os.getpid()
        atexit.register(lambda: os.getpid() == creator and shutil.rmtree(path, ignore_errors=True))
    return path


def count(name: str, amount: float = 1.0) -> None:
    """Add to one of :data:`COUNTERS` in this process; its file is rewritten in the background."""
    count_many({name: amount})


def count_many(amounts: dict[str, float]) -> None:
    """Add to several of :data:`COUNTERS` at once. Returns without touching the file system: this process's
    writer thread (started by its first count) publishes the counts; :func:`flush` waits for it."""
    global _version, _writer
    with _lock:
        for name, amount in amounts.items():
            _counts[name] += amount
        _version += 1
        if _writer is None:
            _writer = threading.Thread(target=_write_forever, name="flylora-metrics", daemon=True)
            _writer.start()
            atexit.register(flush, 1.0)
        _pending.notify()


def flush(timeout: float = 5.0) -> bool:
    """Wait until this process's file holds every count made so far; False if ``timeout`` passed first."""
    with _lock:
        target = _version
        return _published.wait_for(lambda: _written >= target, timeout)


def _write_forever() -> None:
    global _written
    while True:
        with _lock:
            _pending.wait_for(lambda: _written != _version)
            version, snapshot = _version, dict(_counts)
        _write(metrics_dir(), snapshot)  # several counts made meanwhile: one write
        with _lock:
            _written = version
            _published.notify_all()


def _write(folder: str, snapshot: dict[str, float]) -> None:
    global _write_failed
    target = os.path.join(folder, f"counts-{os.getpid()}.json")
    try:
        with open(target + ".tmp", "w") as fh:
            json.dump(snapshot, fh)
        os.replace(target + ".tmp", target)
    except OSError as exc:
        if not _write_failed:
            logger.warning("cannot publish adapter counters in %s: %s", folder, exc)
        _write_failed = True


def read_counts(folder: str) -> dict[str, float]:
    """The sums of every process's published counts in ``folder``."""
    totals = dict.fromkeys(COUNTERS, 0.0)
    for path in glob.glob(os.path.join(folder, "counts-*.json")):
        try:
            with open(path) as fh:
                values = json.load(fh)
        except (OSError, ValueError):
            continue
        for name in totals:
            value = values.get(name) if isinstance(values, dict) else None
            if isinstance(value, (int, float)):
                totals[name] += value
    return totals


class EngineCountersCollector:
    """A prometheus_client collector: :data:`COUNTERS` summed over the engine's processes at scrape time."""

    def __init__(self, folder: str):
        self.folder = folder

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        families: dict[str, CounterMetricFamily] = {}
        for key, value in read_counts(self.folder).items():
            name, _, cache = key.partition(":")
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(name, COUNTERS[key], labels=["cache"] if cache else None)
            family.add_metric([cache] if cache else [], value)
        yield from families.values()

    def describe(self):
        return list(self.collect())


def install_metrics() -> None:
    """Create/export the shared folder and register the collector on the default registry (idempotent).

    Registered in every process that loads the plugin; only the API server's registry is ever served.
    """
    global _collector_installed
    folder = metrics_dir()
    if _collector_installed:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(EngineCountersCollector(folder))
    # Which adapters are resident, per tier (vllm:lora_adapter_loaded and its counts): its own module.
    from flylora_runtime.vllm_plugin.residency import install_residency

    install_residency(folder)
    _collector_installed = True
