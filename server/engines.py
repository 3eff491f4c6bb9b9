"""Talking to the engine replicas: one pooled ``httpx.AsyncClient``, replica choice and failover, eviction,
health. The engine is a vLLM OpenAI server that only ever sees internal adapter ids.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx

from .errors import EngineTimeout, EngineUnavailable
from .metrics import GatewayMetrics
from .routing import ReplicaRouter
from .settings import Settings

log = logging.getLogger("flylora.gateway.engines")

#: Connection-level failures after which the request was surely not processed: safe to send elsewhere.
FAILOVER_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def make_client(settings: Settings) -> httpx.AsyncClient:
    """The one pooled client to all engines.

    Transport ``aiohttp`` (httpx's API over aiohttp's connection pool, from ``httpx-aiohttp``) keeps the
    gateway near 1,000+ requests/s on two cores; httpx's own pool (``httpcore``) polls every pooled
    socket on each request and tops out at a few hundred. ``auto`` takes aiohttp when it is installed.
    """
    limits = httpx.Limits(max_connections=settings.engine_max_connections,
                          max_keepalive_connections=settings.engine_max_connections, keepalive_expiry=30)
    timeout = httpx.Timeout(connect=settings.engine_connect_timeout_s, read=settings.engine_read_timeout_s,
                            write=settings.engine_read_timeout_s, pool=settings.engine_connect_timeout_s)
    transport: httpx.AsyncBaseTransport | None = None
    choice = settings.engine_http_transport
    if choice in ("auto", "aiohttp"):
        try:
            from httpx_aiohttp import AiohttpTransport
        except ImportError:
            if choice == "aiohttp":
                raise ValueError("engine_http_transport 'aiohttp' needs the httpx-aiohttp package") from None
        else:
            transport = AiohttpTransport(limits=limits, trust_env=False)
    log.info("engine client transport: %s", "aiohttp" if transport is not None else "httpcore")
    return httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport, follow_redirects=False,
                             trust_env=False)


@dataclass
class Upstream:
    """An engine's answer being read; :meth:`close` once (returns the replica to the router)."""

    url: str
    response: httpx.Response
    router: ReplicaRouter
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.router.release(self.url)
        await self.response.aclose()


class EnginePool:
    """The replicas behind the gateway."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics, router: ReplicaRouter | None = None):
        self.settings = settings
        self.metrics = metrics
        self.urls = list(settings.engine_urls)
        self.router = router or ReplicaRouter(
            self.urls, affinity_ttl_s=settings.affinity_ttl_s, max_affinity_entries=settings.affinity_max_entries,
            cooldown_s=settings.engine_cooldown_s)
        self.headers = {"content-type": "application/json"}
        if settings.engine_api_key is not None:
            self.headers["authorization"] = f"Bearer {settings.engine_api_key.get_secret_value()}"
        self.client = make_client(settings)
        # Hot path: requests are built from pre-parsed URLs and headers (httpx's per-request merging of
        # client defaults costs about a tenth of the gateway's CPU).
        self._urls: dict[tuple[str, str], httpx.URL] = {}
        self._request_headers = httpx.Headers({**self.headers, "accept": "*/*", "user-agent": "flylora-gateway"})
        self._timeout = self.client.timeout.as_dict()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def send(self, path: str, body: bytes, *, adapter_id: str | None) -> Upstream:
        """POST ``body`` to ``path`` on the chosen replica, failing over while connections fail.

        The response's headers are read, its body not: the caller reads or streams it, then closes.
        """
        tried: list[str] = []
        while (url := self.router.pick(adapter_id, exclude=tried)) is not None:
            tried.append(url)
            self.router.acquire(url)
            request = self._request(url, path, body)
            try:
                response = await self.client.send(request, stream=True)
            except FAILOVER_ERRORS as exc:
                self.router.release(url)
                self.router.record_failure(url)
                self.metrics.upstream_errors.labels(url, "connect").inc()
                log.warning("engine %s unreachable (%s); trying another replica", url, type(exc).__name__)
                continue
            except httpx.TimeoutException:
                self.router.release(url)
                self.metrics.upstream_errors.labels(url, "timeout").inc()
                raise EngineTimeout("The engine did not answer in time.") from None
            except httpx.HTTPError as exc:
                self.router.release(url)
                self.router.record_failure(url)
                self.metrics.upstream_errors.labels(url, "protocol").inc()
                log.warning("engine %s failed: %r", url, exc)
                raise EngineUnavailable("The engine failed to answer.") from None
            except BaseException:
                self.router.release(url)
                raise
            if response.status_code < 500:
                self.router.record_success(url, adapter_id if response.status_code == 200 else None)
            else:
                self.metrics.upstream_errors.labels(url, "status_5xx").inc()
            return Upstream(url=url, response=response, router=self.router)
        raise EngineUnavailable(f"No engine could be reached (tried {len(tried)}).")

    def _request(self, url: str, path: str, body: bytes) -> httpx.Request:
        target = self._urls.get((url, path))
        if target is None:
            target = self._urls[(url, path)] = httpx.URL(url + path)
        return httpx.Request("POST", target, content=body, headers=self._request_headers.copy(),
                             extensions={"timeout": self._timeout})

    async def unload(self, internal_id: str) -> list[str]:
        """Evict an adapter from every replica; returns the replicas where that failed (logged and counted).

        A 404 or 400 answer means the replica did not hold it: that is success.
        """
        self.router.forget(internal_id)
        results = await asyncio.gather(*(self._unload_one(url, internal_id) for url in self.urls))
        return [url for url, ok in zip(self.urls, results, strict=True) if not ok]

    async def _unload_one(self, url: str, internal_id: str) -> bool:
        try:
            response = await self.client.post(url + "/v1/unload_lora_adapter", json={"lora_name": internal_id},
                                              headers=self.headers, timeout=self.settings.unload_timeout_s)
        except httpx.HTTPError as exc:
            self.metrics.upstream_errors.labels(url, "unload").inc()
            log.error("could not evict %s from %s: %s", internal_id, url, type(exc).__name__)
            return False
        if response.status_code in (200, 400, 404):
            return True
        self.metrics.upstream_errors.labels(url, "unload").inc()
        log.error("could not evict %s from %s: HTTP %d", internal_id, url, response.status_code)
        return False

    async def health(self) -> dict[str, bool]:
        """Each replica: did ``GET /health`` answer 200 within the health timeout?"""
        results = await asyncio.gather(*(self._health_one(url) for url in self.urls))
        for url, ok in zip(self.urls, results, strict=True):
            self.metrics.engine_ready.labels(url).set(1 if ok else 0)
        return dict(zip(self.urls, results, strict=True))

    async def _health_one(self, url: str) -> bool:
        try:
            response = await self.client.get(url + "/health", timeout=self.settings.health_timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200
