"""The gateway's side of the engines (its upstream): one pooled ``httpx.AsyncClient`` to every vLLM replica,
replica choice and failover, eviction, health. :class:`UpstreamPool` is that pool (``gw.upstream``);
:class:`UpstreamResponse` one engine answer being read. An engine is a vLLM OpenAI server (started by
``flylora_runtime.engine``) that only ever sees internal adapter ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from server.errors import EngineTimeout, EngineUnavailable
from server.metrics import GatewayMetrics
from server.routing import ReplicaRouter
from server.settings import Settings
from server.transport import EngineClient, EngineTransport, RequestBuilder

log = logging.getLogger("flylora.gateway.upstream")

#: Failures after which the request was surely not processed: sent on to any other replica.
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
try:  # httpx-aiohttp maps most aiohttp connection errors to httpx.ConnectTimeout: look at the cause
    import aiohttp

    _AIOHTTP_UNREACHABLE: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,
                                                             aiohttp.ConnectionTimeoutError)
except ImportError:  # pragma: no cover
    _AIOHTTP_UNREACHABLE = ()


def is_unreachable(exc: BaseException) -> bool:
    """The connection to the engine was never made (refused, connect timeout): nothing was sent."""
    cause = exc.__cause__
    if _AIOHTTP_UNREACHABLE and isinstance(cause, aiohttp.ClientError):
        return isinstance(cause, _AIOHTTP_UNREACHABLE)
    return isinstance(exc, UNREACHABLE_ERRORS)


def is_read_timeout(exc: BaseException) -> bool:
    """A real wait-for-bytes timeout (not retried: the engine may still be working on the request)."""
    cause = exc.__cause__
    if _AIOHTTP_UNREACHABLE and isinstance(cause, aiohttp.ClientError):
        return isinstance(cause, aiohttp.ServerTimeoutError) and not isinstance(cause, _AIOHTTP_UNREACHABLE)
    return isinstance(exc, httpx.TimeoutException) and not isinstance(exc, UNREACHABLE_ERRORS)


def make_client(settings: Settings) -> httpx.AsyncClient:
    """The one pooled client to all engines.

    Transport ``aiohttp`` (httpx's API over aiohttp's connection pool, from ``httpx-aiohttp``; see
    :mod:`server.transport`) keeps the gateway above 1,000 requests/s on two cores; httpx's own pool
    (``httpcore``) polls every pooled socket on each request and tops out at a few hundred. ``auto`` takes
    aiohttp when it is installed.
    """
    limits = httpx.Limits(max_connections=settings.engine_max_connections,
                          max_keepalive_connections=settings.engine_max_connections, keepalive_expiry=30)
    timeout = httpx.Timeout(connect=settings.engine_connect_timeout_s, read=settings.engine_read_timeout_s,
                            write=settings.engine_read_timeout_s, pool=settings.engine_connect_timeout_s)
    transport: httpx.AsyncBaseTransport | None = None
    choice = settings.engine_http_transport
    if choice in ("auto", "aiohttp"):
        if EngineTransport is None:
            if choice == "aiohttp":
                raise ValueError("engine_http_transport 'aiohttp' needs the httpx-aiohttp package") from None
        else:
            transport = EngineTransport(limits=limits, trust_env=False)
    log.info("engine client transport: %s", "aiohttp" if transport is not None else "httpcore")
    return EngineClient(timeout=timeout, limits=limits, transport=transport, follow_redirects=False, trust_env=False)


@dataclass
class UpstreamResponse:
    """An engine's answer being read; :meth:`close` once (returns the replica to the router).

    A non-streamed 200 answer has been read whole; a streamed 200 answer has had its first chunk read
    (``first``; the rest follows from :meth:`chunks`), so an engine that fails before it produced anything
    is retried elsewhere while the client has still seen nothing.
    """

    url: str
    response: httpx.Response
    router: ReplicaRouter
    first: bytes = b""
    rest: AsyncIterator[bytes] | None = None
    closed: bool = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The streamed body: the prefetched first chunk, then the rest as the engine sends it."""
        if self.first:
            yield self.first
        if self.rest is not None:
            async for chunk in self.rest:
                yield chunk

    def broke(self, exc: BaseException, metrics: GatewayMetrics) -> str:
        """The stream broke after it started: count it and, unless it was a read timeout, cool the replica
        down (it most likely died). Returns the error kind, ``timeout`` or ``stream``."""
        kind = "timeout" if is_read_timeout(exc) else "stream"
        metrics.upstream_errors.labels(self.url, kind).inc()
        if kind == "stream":
            self.router.record_failure(self.url)
        log.warning("stream from %s broke: %s", self.url, type(exc).__name__)
        return kind

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.router.release(self.url)
        await self.response.aclose()


class UpstreamPool:
    """The replicas behind the gateway."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics, router: ReplicaRouter | None = None):
        self.settings = settings
        self.metrics = metrics
        self.urls = list(settings.engine_urls)
        self.router = router or ReplicaRouter(
            self.urls, affinity_ttl_s=settings.affinity_ttl_s, max_affinity_entries=settings.affinity_max_entries,
            cooldown_s=settings.engine_cooldown_s, load_factor=settings.routing_load_factor,
            min_spill_in_flight=settings.routing_min_spill_in_flight)
        self.headers = {"content-type": "application/json"}
        if settings.engine_api_key is not None:
            self.headers["authorization"] = f"Bearer {settings.engine_api_key.get_secret_value()}"
        self.client = make_client(settings)
        # Hot path: requests are built from pre-parsed URLs and headers (httpx's per-request merging of
        # client defaults costs about a tenth of the gateway's CPU).
        self._requests = RequestBuilder({**self.headers, "accept": "*/*", "user-agent": "flylora-gateway"},
                                        self.client.timeout)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def send(self, path: str, body: bytes, *, adapter_id: str | None, stream: bool = False) -> UpstreamResponse:
        """POST ``body`` to ``path`` on the chosen replica, with failover.

        A replica that cannot be reached (connection refused) is skipped for the next one, through every
        replica. A replica that fails after taking the request (connection closed before a complete
        non-streamed answer or before the first streamed chunk: the client has received nothing yet) is
        retried once on another replica. Both put the failed replica in cooldown. A read timeout, a 4xx or
        a 5xx answer is not retried. The caller reads the rest of a stream, then closes.
        """
        tried: list[str] = []
        retried = False
        while (decision := self.router.route(adapter_id, exclude=tried)) is not None:
            url = decision.url
            self.metrics.routing_by[("failover" if tried else decision.result,)].inc()
            tried.append(url)
            self.router.acquire(url)
            response: httpx.Response | None = None
            try:
                response = await self.client.send(self._request(url, path, body), stream=True)
                upstream = UpstreamResponse(url=url, response=response, router=self.router)
                if response.status_code == 200:
                    if stream:
                        upstream.rest = response.aiter_bytes()
                        upstream.first = await anext(upstream.rest, b"")
                    else:
                        await response.aread()
            except httpx.TransportError as exc:
                if is_unreachable(exc):
                    await self._failed(url, response, "connect", exc)
                    continue
                if is_read_timeout(exc):
                    await self._release(url, response)
                    self.metrics.upstream_errors.labels(url, "timeout").inc()
                    raise EngineTimeout("The engine did not answer in time.") from None
                await self._failed(url, response, "broken", exc)
                if retried:
                    raise EngineUnavailable("The engine failed to answer, and so did the retry.") from None
                retried = True
                continue
            except httpx.HTTPError as exc:
                await self._failed(url, response, "protocol", exc)
                raise EngineUnavailable("The engine failed to answer.") from None
            except BaseException:
                await self._release(url, response)
                raise
            if response.status_code < 500:
                self.router.record_success(url, adapter_id if response.status_code == 200 else None)
            else:
                self.metrics.upstream_errors.labels(url, "status_5xx").inc()
            return upstream
        raise EngineUnavailable(f"No engine could be reached (tried {len(tried)}).")

    async def _release(self, url: str, response: httpx.Response | None) -> None:
        self.router.release(url)
        if response is not None:
            with contextlib.suppress(httpx.HTTPError):
                await response.aclose()

    async def _failed(self, url: str, response: httpx.Response | None, kind: str, exc: BaseException) -> None:
        await self._release(url, response)
        self.router.record_failure(url)
        self.metrics.upstream_errors.labels(url, kind).inc()
        log.warning("engine %s failed (%s: %s); trying another replica", url, kind, type(exc).__name__)

    def _request(self, url: str, path: str, body: bytes) -> httpx.Request:
        return self._requests.post(url, path, body)

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

    async def watch_health(self) -> None:
        """Active health checks, forever: every ``health_check_interval_s`` probe each replica's ``/health``;
        after ``health_check_failures`` failures in a row eject it from routing, readmit it on the first
        probe that passes. Runs as a task for the app's lifetime."""
        interval = self.settings.health_check_interval_s
        needed = self.settings.health_check_failures
        failures = dict.fromkeys(self.urls, 0)
        while True:
            for url, ok in (await self.health()).items():
                failures[url] = 0 if ok else failures[url] + 1
                if ok and self.router.is_ejected(url):
                    self.router.readmit(url)
                    log.warning("engine %s passes its health check again: readmitted", url)
                elif failures[url] >= needed and not self.router.is_ejected(url):
                    self.router.eject(url)
                    log.warning("engine %s failed %d health checks in a row: ejected", url, failures[url])
            await asyncio.sleep(interval)

    async def _health_one(self, url: str) -> bool:
        try:
            response = await self.client.get(url + "/health", timeout=self.settings.health_timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200
