"""Adapter files changed behind the service's back: found before a request reaches the engines.

The store is shared (a volume, a PVC); an operator, a backup restore, a full disk or a bad block can remove or
damage an adapter's files after the gateway validated them. An engine told to load such an adapter fails, and
vLLM's engine core dies when the load happens inside a scheduling step (an adapter that dropped out of the
engine's CPU cache and is needed again). So the gateway checks the files before it sends a request:

* every ``check_interval_s`` per adapter it stats both files (a few microseconds, in a worker thread);
* when a file's identity (inode, size, modification time) differs from the last one it verified, it verifies
  again: the weights' size and SHA-256 against the registry (what was validated at upload), the config
  parsed and its ``r``, ``top_k`` and routing against the registry. One verification per adapter runs at a
  time; concurrent requests wait for it.

An adapter that fails is **unavailable**: its requests get 503 ``adapter_unavailable`` (a fault of the
service's storage, not of the request; it clears by itself as soon as the files are restored, which the
next check sees), ``GET /v1/adapters/{name}`` shows ``status: "unavailable"`` with the reason in
``status_details``, and the metrics ``flylora_gateway_adapters_unavailable`` (how many now) and
``flylora_gateway_adapter_integrity_failures_total{reason}`` (each time one is found) count it, and the engines
are told to unload it (so none reloads the damaged files from a scheduling step). Nothing else changes: other
adapters keep serving.

Left open: files damaged after the last check (at most ``check_interval_s`` ago) while the request is on its
way, and an engine that must reload them (the adapter dropped out of its CPU cache) in that window; vLLM 0.32
has no way to fail only that request, so its engine core dies and is restarted (docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge

from flylora_runtime.format.checkpoint import CONFIG_NAME, WEIGHTS_NAME, sha256_file
from flylora_runtime.format.config import FlyLoRAConfig
from flylora_runtime.format.errors import AdapterError

from server.errors import GatewayError, ModelNotFound
from server.registry import Adapter, Registry

log = logging.getLogger("flylora.gateway.integrity")

#: Reasons, as metric label values.
MISSING, SIZE, CHECKSUM, CONFIG = "missing", "size_mismatch", "checksum_mismatch", "config_invalid"

Fingerprint = tuple[tuple[int, int, int], tuple[int, int, int]] | None


class AdapterUnavailable(GatewayError):
    """The adapter's stored files are missing or damaged: the service cannot serve it until they are restored."""

    status, type_, code = 503, "server_error", "adapter_unavailable"

    def __init__(self, name: str, reason: str):
        super().__init__(f"The adapter `{name}` cannot be served: {reason}. Its stored files changed after it was "
                         "uploaded; it serves again as soon as they are restored, or delete it and upload it "
                         "again.", param="model")


@dataclass
class Verdict:
    fingerprint: Fingerprint
    reason: str | None  # None: intact
    detail: str = ""
    checked: float = 0.0
    confirmed: bool = False  # a failure confirmed against the registry (not an adapter being deleted): counted

    @property
    def ok(self) -> bool:
        return self.reason is None


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def fingerprint(folder: Path) -> Fingerprint:
    config, weights = _stat(folder / CONFIG_NAME), _stat(folder / WEIGHTS_NAME)
    if config is None or weights is None:
        return None
    return config, weights


def verify(folder: Path, adapter: Adapter) -> tuple[str | None, str]:
    """(reason, detail) of what is wrong with the adapter's files, (None, "") when they are as registered.
    Blocking: reads and hashes the weights."""
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            return MISSING, f"its file {path.name} is missing from the adapter store"
    size = weights_path.stat().st_size
    if size != adapter.bytes:
        return SIZE, f"its weights file is {size} bytes, {adapter.bytes} were uploaded"
    try:
        config = FlyLoRAConfig.from_json_bytes(config_path.read_bytes())
    except (AdapterError, OSError, ValueError, json.JSONDecodeError) as exc:
        return CONFIG, f"its config no longer parses ({type(exc).__name__})"
    if (config.r, config.top_k, config.routing) != (adapter.r, adapter.top_k, adapter.routing):
        return CONFIG, "its config no longer matches the uploaded one"
    try:
        digest = sha256_file(weights_path)
    except OSError as exc:
        return MISSING, f"its weights file cannot be read ({type(exc).__name__})"
    if digest != adapter.sha256:
        return CHECKSUM, "its weights file's SHA-256 no longer matches the uploaded one"
    return None, ""


class IntegrityChecker:
    """Per-adapter verdicts on the store's files (see the module docstring)."""

    def __init__(self, store_root: Path, registry: CollectorRegistry, *, check_interval_s: float = 1.0,
                 evict: Callable[[str], Awaitable[object]] | None = None, clock=time.monotonic):
        self.root = Path(store_root)
        self.evict = evict
        self._evictions: set[asyncio.Future[object]] = set()
        self.check_interval_s = check_interval_s
        self.clock = clock
        self.verdicts: dict[str, Verdict] = {}
        self._running: dict[str, asyncio.Future[Verdict]] = {}
        self.unavailable = Gauge("flylora_gateway_adapters_unavailable",
                                 "Adapters whose stored files are missing or damaged (their requests get 503).",
                                 registry=registry)
        self.unavailable.set_function(lambda: sum(v.confirmed for v in self.verdicts.values()))
        self.failures = Counter("flylora_gateway_adapter_integrity_failures",
                                "Adapters found missing or damaged in the store, by reason.", ["reason"],
                                registry=registry)
        for reason in (MISSING, SIZE, CHECKSUM, CONFIG):
            self.failures.labels(reason)

    def cached(self, internal_id: str) -> Verdict | None:
        return self.verdicts.get(internal_id)

    async def vouch(self, adapter: Adapter) -> None:
        """The gateway has just validated, hashed and stored the adapter's files: record them as intact under
        their present identity, so that its first request does not hash them again (a cold adapter's first
        token waited ~20 ms for that with a 37 MB checkpoint)."""
        fp = await anyio.to_thread.run_sync(fingerprint, self.root / adapter.internal_id)
        if fp is not None:
            self.verdicts[adapter.internal_id] = Verdict(fingerprint=fp, reason=None, checked=self.clock())

    def forget(self, internal_id: str) -> None:
        """The adapter was deleted."""
        self.verdicts.pop(internal_id, None)

    async def check(self, adapter: Adapter, *, force: bool = False) -> Verdict:
        """The adapter's verdict: cached while younger than ``check_interval_s`` (unless ``force``), re-verified
        when its files' identity changed."""
        cached = self.verdicts.get(adapter.internal_id)
        now = self.clock()
        if cached is not None and not force and now - cached.checked < self.check_interval_s:
            return cached
        running = self._running.get(adapter.internal_id)
        if running is None:
            running = asyncio.ensure_future(self._check(adapter, cached))
            self._running[adapter.internal_id] = running
            running.add_done_callback(lambda _f, key=adapter.internal_id: self._running.pop(key, None))
        return await asyncio.shield(running)

    async def _check(self, adapter: Adapter, cached: Verdict | None) -> Verdict:
        folder = self.root / adapter.internal_id
        fp = await anyio.to_thread.run_sync(fingerprint, folder)
        if cached is not None and fp is not None and fp == cached.fingerprint:
            cached.checked = self.clock()
            return cached
        reason, detail = await anyio.to_thread.run_sync(verify, folder, adapter)
        verdict = Verdict(fingerprint=fp, reason=reason, detail=detail, checked=self.clock())
        if reason is not None and cached is not None and cached.reason == reason:
            verdict.confirmed = cached.confirmed  # the same failure as before: already counted
        self.verdicts[adapter.internal_id] = verdict
        if reason is None and cached is not None and cached.confirmed:
            log.warning("adapter %s (%s) is intact again: available", adapter.internal_id, adapter.name)
        return verdict

    def confirm(self, adapter: Adapter, verdict: Verdict) -> None:
        """The failure is real (the adapter is still registered): count it once and log it."""
        if not verdict.ok and not verdict.confirmed:
            verdict.confirmed = True
            self.failures.labels(verdict.reason).inc()
            log.error("adapter %s (%s) is unavailable: %s", adapter.internal_id, adapter.name, verdict.detail)
            if self.evict is not None:
                # The engines forget it: should a request for it still reach one (another gateway replica that
                # has not looked yet), the engine resolves it anew, and its resolver refuses damaged files
                # cleanly, instead of reloading them inside a scheduling step (which kills vLLM's engine core).
                task = asyncio.ensure_future(self.evict(adapter.internal_id))
                self._evictions.add(task)
                task.add_done_callback(self._evictions.discard)


async def ensure_servable(checker: IntegrityChecker, registry: Registry, adapter: Adapter) -> None:
    """Return when the adapter's files are intact; else :class:`AdapterUnavailable`, or :class:`ModelNotFound`
    when the adapter turns out to be gone from the registry (deleted meanwhile: its files went first)."""
    verdict = await checker.check(adapter)
    if verdict.ok:
        return
    current = await anyio.to_thread.run_sync(registry.get_adapter, adapter.tenant_id, adapter.name)
    if current is None or current.internal_id != adapter.internal_id:
        checker.forget(adapter.internal_id)
        raise ModelNotFound(adapter.name)
    checker.confirm(adapter, verdict)
    raise AdapterUnavailable(adapter.name, verdict.detail)
