"""``Gateway``: the gateway's long-lived parts (registry, store, upstream pool, limiter, metrics, caches), built
once per app and kept on ``app.state.gateway``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from flylora_runtime.format.errors import BaseModelMismatch
from flylora_runtime.format.modelspec import BaseModelSpec

from server.admission import UploadAdmission
from server.cache import TTLCache
from server.inflight import AdapterFlights
from server.integrity import IntegrityChecker
from server.upstream import UpstreamPool
from server.errors import BaseModelUnavailable
from server.fair_admission import FairAdmission
from server.keyguard import KeyGuard
from server.limits import TenantLimiter
from server.metrics import GatewayMetrics
from server.registry import Adapter, Registry, Tenant
from server.request_policy import CacheSalts, RequestPolicy
from server.settings import Settings
from server.store import AdapterStore

if TYPE_CHECKING:
    from server.quality_recorder import QualityRecorder

log = logging.getLogger("flylora.gateway")


@dataclass
class Gateway:
    settings: Settings
    registry: Registry
    store: AdapterStore
    upstream: UpstreamPool
    limiter: TenantLimiter
    metrics: GatewayMetrics
    tenants_by_key: TTLCache[Tenant]
    adapters_by_name: TTLCache[Adapter]
    keys: KeyGuard
    policy: RequestPolicy
    cache_salts: CacheSalts
    uploads: UploadAdmission
    # reliability (docs/RELIABILITY.md): fair admission, adapter file checks, requests in flight per adapter
    admission: FairAdmission = field(default_factory=lambda: FairAdmission(max_in_flight=0))
    integrity: IntegrityChecker | None = None
    flights: AdapterFlights = field(default_factory=AdapterFlights)
    _base_spec: BaseModelSpec | None = field(default=None, repr=False)
    quality: QualityRecorder | None = None  # per-adapter quality windows; set by the app (server.quality_recorder)

    @classmethod
    def build(cls, settings: Settings) -> Gateway:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        metrics = GatewayMetrics(max_adapter_labels=settings.max_adapter_labels,
                                 base_model_id=settings.base_model_id)
        registry = Registry.open(settings.db_url)
        store = AdapterStore(settings.store_dir)
        admission = FairAdmission(
            max_in_flight=settings.admission_in_flight_per_engine * len(settings.engine_urls),
            tenant_share=settings.admission_tenant_share, queue_depth=settings.admission_queue_depth,
            queue_timeout_s=settings.admission_queue_timeout_s)
        admission.export(metrics.registry)
        upstream = UpstreamPool(settings, metrics)
        return cls(
            settings=settings,
            registry=registry,
            store=store,
            upstream=upstream,
            limiter=TenantLimiter(max_concurrency=settings.max_concurrency_per_tenant,
                                  tokens_per_minute=settings.tokens_per_minute_per_tenant),
            metrics=metrics,
            tenants_by_key=TTLCache(settings.auth_cache_ttl_s),
            adapters_by_name=TTLCache(settings.auth_cache_ttl_s),
            keys=KeyGuard(lambda: anyio.to_thread.run_sync(registry.key_hashes),
                          refresh_s=settings.key_directory_refresh_s,
                          lookups_per_s=settings.unknown_key_lookups_per_s,
                          negative_entries=settings.unknown_key_cache_entries),
            policy=RequestPolicy(settings),
            cache_salts=CacheSalts.from_settings(settings),
            uploads=UploadAdmission(settings, store, registry),
            admission=admission,
            integrity=IntegrityChecker(store.root, metrics.registry, check_interval_s=settings.adapter_check_interval_s,
                                       evict=upstream.unload),
        )

    async def aclose(self) -> None:
        await self.upstream.aclose()
        self.registry.close()

    def base_spec(self) -> BaseModelSpec:
        """The base model's shapes, read once from its config.json (blocking: call from a worker thread)."""
        if self._base_spec is None:
            try:
                self._base_spec = BaseModelSpec.from_pretrained(self.settings.base_dir)
            except (OSError, ValueError, KeyError, BaseModelMismatch) as exc:
                log.error("cannot read the base model's config.json in %s: %s", self.settings.base_dir, exc)
                raise BaseModelUnavailable(
                    "The base model's configuration is not available; adapters cannot be validated now.") from None
        return self._base_spec
