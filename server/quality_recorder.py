"""Collecting per-request energies from the engines into the shared quality windows, and exporting them.

The completion path (``server.proxy``) does two cheap things per request: :meth:`QualityRecorder.tag` gives
the engine request an id of the gateway's choosing (``request_id``, which vLLM uses for its answer's id:
a tenant cannot choose it, so cannot read or spoil another request's energies), and, when the answer has
gone out whole (status 200; a stream the client read to the end), :meth:`QualityRecorder.observe` queues
``(engine, id, subject, tokens received)``. Nothing waits for energies on the request path.

A background task (:meth:`QualityRecorder.run`) drains the queue every ``quality_flush_interval_s``: one
``POST /flylora/energy`` per engine for all its finished requests (the engine has measured every token of
an answer before it sent it), then one database transaction that appends the energies to their windows
(:class:`server.quality_store.QualityStore`). Every ``quality_refresh_s`` it reloads all subjects'
summaries from the database: that is what ``/metrics`` exports, the same on every gateway replica.

Bounded: at most ``quality_queue_max`` queued requests (the oldest dropped, counted); an engine that has no
``/flylora/energy`` (started with ``--no-energy``, or stock vLLM) is asked again only after a minute.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import anyio
import httpx
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

from server.metrics import OTHER, GatewayMetrics
from server.quality import Sample
from server.quality_store import Observation, QualityStore, SubjectSummary, base_subject
from server.registry import Adapter, Registry, Tenant
from server.settings import Settings

log = logging.getLogger("flylora.gateway.quality")

ENERGY_PATH = "/flylora/energy"
MAX_PER_CALL = 1024
UNSUPPORTED_RETRY_S = 60.0


@dataclass(frozen=True)
class Pending:
    engine: str
    answer_id: str
    tokens: int
    subject: str
    tenant_id: int
    tenant_name: str
    model: str
    retried: bool = False


class QualityRecorder:
    """Queue of finished requests -> engines' energies -> windows in the database; gauges for /metrics."""

    def __init__(self, settings: Settings, registry: Registry, metrics: GatewayMetrics,
                 client: httpx.AsyncClient, headers: dict[str, str]):
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.client = client
        self.headers = headers
        self.store = QualityStore(registry.db, settings.quality_window)
        self.queue: deque[Pending] = deque()
        self.unsupported_until: dict[str, float] = {}
        self.summaries: list[SubjectSummary] = []
        self._wake = asyncio.Event()
        self.samples = Counter("flylora_gateway_quality_samples",
                               "Finished requests by what became of their energies: recorded (into a window), "
                               "missing (the engine had none), unsupported (engine without /flylora/energy), "
                               "error (the engine call failed), dropped (queue full).",
                               ["result"], registry=metrics.registry)
        for result in ("recorded", "missing", "unsupported", "error", "dropped"):
            self.samples.labels(result)
        metrics.registry.register(QualityCollector(self))

    @classmethod
    def for_gateway(cls, gw) -> QualityRecorder | None:
        """The gateway's recorder (None when ``quality_enabled`` is off)."""
        if not gw.settings.quality_enabled:
            return None
        return cls(gw.settings, gw.registry, gw.metrics, gw.upstream.client, gw.upstream.headers)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Last flush at shutdown (bounded: an engine that is gone costs at most ``timeout``)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            try:
                await self.flush()
            except Exception:
                log.exception("last quality flush failed")

    # --- the request path ---------------------------------------------------------------------------------
    @staticmethod
    def tag(payload: dict[str, Any]) -> str:
        """Set the engine request's id (vLLM answers with ``<prefix>-<id>``); returns it."""
        request_id = os.urandom(16).hex()
        payload["request_id"] = request_id
        return request_id

    def observe(self, engine: str, endpoint: str, request_id: str, tenant: Tenant, adapter: Adapter | None,
                model: str, completion_tokens: int) -> None:
        """A request answered whole: queue it for its energies."""
        prefix = "chatcmpl-" if endpoint == "chat.completions" else "cmpl-"
        subject = adapter.internal_id if adapter is not None else base_subject(tenant.id)
        if len(self.queue) >= self.settings.quality_queue_max:
            self.queue.popleft()
            self.samples.labels("dropped").inc()
        self.queue.append(Pending(engine, prefix + request_id, completion_tokens, subject, tenant.id, tenant.name,
                                  model))
        if len(self.queue) >= MAX_PER_CALL:
            self._wake.set()

    # --- the background task ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Flush forever (a task for the app's lifetime)."""
        await self.refresh()
        last_refresh = time.monotonic()
        while True:
            with anyio.move_on_after(self.settings.quality_flush_interval_s):
                await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                if time.monotonic() - last_refresh >= self.settings.quality_refresh_s:
                    await self.refresh()
                    last_refresh = time.monotonic()
            except Exception:  # never let the task die; the next round retries
                log.exception("quality recorder round failed")

    async def flush(self) -> int:
        """Fetch the energies of every queued request and append them; returns how many were recorded."""
        if not self.queue:
            return 0
        batch, self.queue = list(self.queue), deque()
        by_engine: dict[str, list[Pending]] = {}
        for p in batch:
            by_engine.setdefault(p.engine, []).append(p)
        results = await asyncio.gather(*(self._fetch(engine, items) for engine, items in by_engine.items()))
        observations = [o for part in results for o in part]
        if observations:
            try:
                await anyio.to_thread.run_sync(self.store.append, observations)
            except Exception:  # the database is down or locked: these samples are lost, the next ones may not be
                log.exception("could not store %d quality samples", len(observations))
                self.samples.labels("error").inc(len(observations))
                return 0
            self.samples.labels("recorded").inc(len(observations))
        return len(observations)

    async def _fetch(self, engine: str, items: list[Pending]) -> list[Observation]:
        if self.unsupported_until.get(engine, 0.0) > time.monotonic():
            self.samples.labels("unsupported").inc(len(items))
            return []
        out: list[Observation] = []
        for start in range(0, len(items), MAX_PER_CALL):
            part = items[start:start + MAX_PER_CALL]
            body = {"requests": [{"id": p.answer_id, "tokens": p.tokens} for p in part]}
            try:
                response = await self.client.post(engine + ENERGY_PATH, json=body, headers=self.headers,
                                                  timeout=self.settings.quality_engine_timeout_s)
            except httpx.HTTPError as exc:
                log.warning("could not fetch energies from %s: %s", engine, type(exc).__name__)
                self._retry_or_drop(part)
                continue
            if response.status_code in (404, 405):
                log.warning("engine %s has no %s (started with --no-energy?); quality figures skip its requests",
                            engine, ENERGY_PATH)
                self.unsupported_until[engine] = time.monotonic() + UNSUPPORTED_RETRY_S
                self.samples.labels("unsupported").inc(len(items) - start)
                return out
            try:
                results = response.json()["results"] if response.status_code == 200 else None
            except (ValueError, KeyError, TypeError):
                results = None
            if not isinstance(results, dict):
                log.warning("engine %s answered %s with HTTP %d: %s", engine, ENERGY_PATH, response.status_code,
                            response.text[:200])
                self._retry_or_drop(part)
                continue
            missing = 0
            for p in part:
                sample = _sample(results.get(p.answer_id))
                if sample is None:
                    missing += 1
                    continue
                out.append(Observation(p.subject, p.tenant_id, p.tenant_name, p.model, sample))
            if missing:
                self.samples.labels("missing").inc(missing)
                log.info("engine %s had no energies for %d of %d finished requests", engine, missing, len(part))
        return out

    def _retry_or_drop(self, part: list[Pending]) -> None:
        """A failed engine call: its requests are asked once more next round (the engine keeps unclaimed
        entries), then dropped and counted."""
        again = [replace(p, retried=True) for p in part if not p.retried]
        self.queue.extend(again)
        if len(part) > len(again):
            self.samples.labels("error").inc(len(part) - len(again))

    async def refresh(self) -> None:
        """Reload every subject's summary from the database, dropping deleted adapters and tenants."""
        def load() -> list[SubjectSummary]:
            subjects = self.store.subjects()  # first: an adapter or tenant read after it existed before it
            known = self.registry.all_internal_ids()
            tenants = {t.id for t, _ in self.registry.list_tenants()}
            gone = [s for s, tid in subjects if (s not in known if s.startswith("fl-") else tid not in tenants)]
            if gone:
                self.store.forget(gone)
            return self.store.summaries()

        self.summaries = await anyio.to_thread.run_sync(load)


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _sample(result: Any) -> Sample | None:
    """An engine's per-request result -> a sample (None if absent or malformed)."""
    if not isinstance(result, dict):
        return None
    energy = _finite(result.get("energy"))
    tokens = result.get("tokens")
    if energy is None or not isinstance(tokens, int) or tokens <= 0:
        return None
    return Sample(energy=energy, max_prob=_finite(result.get("max_prob")), entropy=_finite(result.get("entropy")),
                  tokens=tokens)


#: gauge name -> (help, path into a summary)
GAUGES = {
    "flylora_adapter_quality_window_fill": ("Fraction of the quality window filled (1: N requests).", None),
    "flylora_adapter_quality_mean_energy": ("Mean per-request energy over the quality window.", ("mean_energy",)),
    "flylora_adapter_quality_mde": ("Meta-Distribution Energy of the full quality window.", ("mde",)),
    "flylora_adapter_quality_drift": ("Kolmogorov-Smirnov statistic D of the window's energies against the "
                                      "reference window (0: same distribution, 1: disjoint).", ("drift", "ks")),
    "flylora_adapter_quality_drift_p_value": ("p-value of the drift statistic under no change.",
                                              ("drift", "p_value")),
    "flylora_adapter_quality_estimated_accuracy": ("Accuracy estimated from MDE by the adapter's calibration.",
                                                   ("estimated_accuracy",)),
}


class QualityCollector:
    """Gauges per (tenant, adapter) from the recorder's last refresh. Adapter labels share the gateway's cap
    (``max_adapter_labels``); adapters past it are not exported (a gauge cannot be summed into ``other``)."""

    def __init__(self, recorder: QualityRecorder):
        self.recorder = recorder

    def collect(self):
        families = {name: GaugeMetricFamily(name, help_, labels=["tenant", "adapter"])
                    for name, (help_, _) in GAUGES.items()}
        label = self.recorder.metrics.adapter_label
        for entry in self.recorder.summaries:
            adapter = label(entry.tenant_name, entry.model)
            if adapter == OTHER:
                continue
            window = entry.summary.get("window") or {}
            for name, (_, path) in GAUGES.items():
                if path is None:
                    size = window.get("size") or 0
                    value = (window.get("fill", 0) / size) if size else None
                else:
                    value: Any = entry.summary
                    for key in path:
                        value = value.get(key) if isinstance(value, dict) else None
                if isinstance(value, (int, float)) and math.isfinite(value):
                    families[name].add_metric([entry.tenant_name, adapter], float(value))
        yield from families.values()

    def describe(self):
        return [GaugeMetricFamily(name, help_, labels=["tenant", "adapter"]) for name, (help_, _) in GAUGES.items()]
