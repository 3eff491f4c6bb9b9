"""The HTTP client to the engines, trimmed for the proxy's hot path (still one pooled ``httpx.AsyncClient``).

* :class:`EngineClient`: an ``httpx.AsyncClient`` that keeps no cookies. Engines have no business setting
  cookies on the gateway, and a jar shared by every tenant's requests would replay one answer's cookies on
  all later ones; skipping the jar also saves parsing each answer's headers for ``Set-Cookie``.
* :class:`EngineTransport`: httpx-aiohttp's transport (aiohttp's connection pool, the same exception
  mapping) with the per-request conversions cached: the URL string, the timeout object, the headers; a
  small whole answer (a completion's JSON) is read at once, streams and encoded answers stay streamed.
* :class:`RequestBuilder`: engine requests with their headers (``Host``, ``Content-Length``...) built
  once per replica and path rather than merged and normalised per request.
"""

from __future__ import annotations

from typing import Any

import httpx

try:
    import aiohttp
    from httpx_aiohttp import AiohttpTransport
    from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions
    from multidict import CIMultiDict, CIMultiDictProxy
except ImportError:  # pragma: no cover - the gateway extra installs httpx-aiohttp
    AiohttpTransport = None  # type: ignore[assignment,misc]

EngineTransport: Any = None


#: Answers with a Content-Length up to this, no Content-Encoding and not SSE are read in the transport.
EAGER_BODY_BYTES = 1 << 20


class _NoCookies(httpx.Cookies):
    def extract_cookies(self, response: httpx.Response) -> None:
        pass


class EngineClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` that never stores cookies from responses (cookies it is given are still sent)."""

    def __init__(self, *, cookies: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._no_cookies = _NoCookies(cookies)

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        self._no_cookies = _NoCookies(cookies)


class RequestBuilder:
    """``POST`` requests to ``base_url + path`` with fixed headers, the body given per request."""

    def __init__(self, headers: dict[str, str], timeout: httpx.Timeout):
        self.headers = headers
        self.extensions = {"timeout": timeout.as_dict()}
        self._targets: dict[tuple[str, str], tuple[httpx.URL, list[tuple[bytes, bytes]]]] = {}

    def post(self, base_url: str, path: str, body: bytes) -> httpx.Request:
        target = self._targets.get((base_url, path))
        if target is None:
            url = httpx.URL(base_url + path)
            # As httpx would build them for `content=body` (Host first), minus the per-request length.
            raw = [(b"Host", url.netloc)] + httpx.Headers(self.headers).raw
            target = self._targets[(base_url, path)] = (url, raw)
        url, raw = target
        # `stream=` takes the headers as given (no merging, no defaults added); read() keeps the body in
        # memory as `content=` would, so it can be sent again on failover.
        request = httpx.Request("POST", url, headers=[*raw, (b"Content-Length", b"%d" % len(body))],
                                stream=httpx.ByteStream(body), extensions=self.extensions)
        request.read()
        return request


if AiohttpTransport is not None:

    class EngineTransport(AiohttpTransport):
        """``httpx_aiohttp.AiohttpTransport`` with its per-request conversions cached (see the module doc)."""

        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self._urls: dict[int, tuple[httpx.URL, str]] = {}
            self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}
            self._headers: dict[tuple[tuple[bytes, bytes], ...], CIMultiDictProxy[str]] = {}

        def _aiohttp_headers(self, raw: list[tuple[bytes, bytes]]) -> CIMultiDictProxy[str]:
            key = tuple(raw)
            headers = self._headers.get(key)
            if headers is None:
                if len(self._headers) >= 1024:
                    self._headers.clear()
                headers = self._headers[key] = CIMultiDictProxy(CIMultiDict(
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in raw))
            return headers

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if not isinstance(self.client, aiohttp.ClientSession):
                self.client = self.get_client()
            if self.proxy is not None or request.extensions.get("sni_hostname"):
                return await super().handle_async_request(request)
            timeout = request.extensions.get("timeout", {})
            timeout_key = (timeout.get("connect"), timeout.get("read"), timeout.get("pool"))
            client_timeout = self._timeouts.get(timeout_key)
            if client_timeout is None:
                client_timeout = self._timeouts[timeout_key] = aiohttp.ClientTimeout(
                    sock_connect=timeout_key[0], sock_read=timeout_key[1], connect=timeout_key[2])
            # By identity: RequestBuilder reuses one URL object per target (kept here, so its id stays its own).
            known = self._urls.get(id(request.url))
            if known is not None and known[0] is request.url:
                url = known[1]
            else:
                if len(self._urls) >= 1024:
                    self._urls.clear()
                url = str(request.url)
                self._urls[id(request.url)] = (request.url, url)
            with map_aiohttp_exceptions():
                data: Any
                try:
                    data = request.content or None
                except httpx.RequestNotRead:
                    data = request.stream
                    request.headers.pop("transfer-encoding", None)  # aiohttp frames the stream itself
                response = await self.client.request(
                    method=request.method, url=url, headers=self._aiohttp_headers(request.headers.raw), data=data,
                    allow_redirects=False, auto_decompress=False, compress=False, timeout=client_timeout,
                ).__aenter__()
            extensions = {"http_version": b"HTTP/1.1"}
            if response.reason:
                extensions["reason_phrase"] = response.reason.encode()
            length = response.content_length
            if (length is not None and length <= EAGER_BODY_BYTES and "content-encoding" not in response.headers
                    and not response.content_type.startswith("text/event-stream")):
                # A small whole answer (a completion's JSON, an error): read it now, in one call, and skip
                # httpx's per-chunk iterator layers. The caller reads or streams it as ever.
                with map_aiohttp_exceptions():
                    body = await response.read()  # the connection goes back to the pool at its end
                return httpx.Response(status_code=response.status, headers=response.raw_headers, content=body,
                                      request=request, extensions=extensions)
            return httpx.Response(status_code=response.status, headers=response.raw_headers,
                                  stream=AiohttpResponseStream(response), request=request, extensions=extensions)
