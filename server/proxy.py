"""Proxying ``/v1/chat/completions`` and ``/v1/completions`` to an engine.

Per request: read the body under the size cap, check it (JSON object, ``model``, caps on ``max_tokens``,
``n``, prompt length), map the tenant-facing ``model`` to the internal adapter id, admit it against the
tenant's limits, send it to a replica, and hand the answer back with ``model`` set to what the caller sent
(every SSE chunk too; an internal id never leaves). Streams pass through event by event; when the client
disconnects the upstream connection is closed, which makes vLLM abort the request.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.adapters import resolve_adapter
from server.engines import Upstream
from server.errors import (
    EngineProtocolError,
    EngineTimeout,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    error_body,
)
from server.registry import Adapter, Tenant
from server.settings import Settings
from server.state import Gateway

log = logging.getLogger("flylora.gateway.proxy")

#: endpoint label -> engine path
ENDPOINTS = {"chat.completions": "/v1/chat/completions", "completions": "/v1/completions"}
CLIENT_CLOSED = 499  # status recorded in metrics when the client went away mid-stream


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- request checks (pure) -----------------------------------------------------------------------------------
@dataclass
class CompletionRequest:
    payload: dict[str, Any]
    model: str
    stream: bool
    wants_usage: bool


def _int_field(payload: dict[str, Any], key: str, *, low: int, high: int) -> None:
    value = payload.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"`{key}` must be an integer, found {type(value).__name__}.", param=key)
    if value < low or value > high:
        raise InvalidRequest(f"`{key}` must be between {low} and {high}, found {value}.", param=key)


def prompt_size(endpoint: str, payload: dict[str, Any]) -> int:
    """Characters (or token ids) in the prompt; 400 when the prompt is missing or of the wrong type."""
    if endpoint == "chat.completions":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("`messages` must be a non-empty list.", param="messages")
        total = 0
        for message in messages:
            if not isinstance(message, dict):
                raise InvalidRequest("Each message must be an object.", param="messages")
            content = message.get("content")
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return total
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt:
        total = 0
        for item in prompt:
            if isinstance(item, str):
                total += len(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                total += 1
            elif isinstance(item, list):
                total += len(item)
            else:
                raise InvalidRequest("`prompt` must be a string, a list of strings or of token ids.", param="prompt")
        return total
    raise InvalidRequest("`prompt` must be a non-empty string, a list of strings or of token ids.", param="prompt")


def parse_completion_request(body: bytes, endpoint: str, settings: Settings) -> CompletionRequest:
    """Check a completion request body against the caps; never clamps, rejects with 400."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be a boolean.", param="stream")
    cap = settings.max_tokens_cap
    _int_field(payload, "max_tokens", low=0, high=cap)
    _int_field(payload, "max_completion_tokens", low=0, high=cap)
    _int_field(payload, "n", low=1, high=settings.max_n)
    _int_field(payload, "best_of", low=1, high=settings.max_n)
    size = prompt_size(endpoint, payload)
    if size > settings.max_prompt_chars:
        raise InvalidRequest(f"The prompt is {size} characters long; the limit is {settings.max_prompt_chars}.",
                             param="messages" if endpoint == "chat.completions" else "prompt")
    wants_usage = False
    if stream:
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise InvalidRequest("`stream_options` must be an object.", param="stream_options")
        wants_usage = bool((options or {}).get("include_usage"))
        # Usage is always asked of the engine (metrics, token limits); it reaches the client only if asked.
        payload["stream_options"] = {**(options or {}), "include_usage": True}
    return CompletionRequest(payload=payload, model=model, stream=stream, wants_usage=wants_usage)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, or :class:`PayloadTooLarge` as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit}.")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


# --- one request in flight ------------------------------------------------------------------------------------
@dataclass
class Flight:
    """Book-keeping of one admitted request; :meth:`finish` runs exactly once, whatever happens."""

    gw: Gateway
    tenant: Tenant
    endpoint: str
    request: CompletionRequest
    adapter: Adapter | None
    started: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 500
    first_token_seen: bool = False
    done: bool = False
    quality: tuple[str, str] | None = None  # quality hook: (engine request id, engine url)
    internal: bytes = field(default=b"", init=False)
    public: bytes = field(default=b"", init=False)

    def __post_init__(self) -> None:
        self.gw.metrics.in_flight_by[(self.tenant.name,)].inc()
        if self.adapter is not None:
            self.internal = self.adapter.internal_id.encode()
            self.public = self.request.model.encode()

    def sanitize(self, raw: bytes) -> bytes:
        """Replace the internal id by the caller's model name anywhere in an engine answer."""
        return raw.replace(self.internal, self.public) if self.internal else raw

    def take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            try:
                self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                self.completion_tokens = int(usage.get("completion_tokens") or 0)
            except (TypeError, ValueError):
                log.warning("ignoring malformed usage from the engine: %r", usage)

    def finish(self, status: int | None = None) -> None:
        if self.done:
            return
        self.done = True
        if status is not None:
            self.status = status
        gw, tenant, m = self.gw, self.tenant, self.gw.metrics
        gw.limiter.release(tenant.id)
        gw.limiter.charge(tenant.id, self.prompt_tokens + self.completion_tokens,
                          tokens_per_minute=tenant.tokens_per_minute)
        m.in_flight_by[(tenant.name,)].dec()
        m.requests_by[(tenant.name, self.endpoint, self.status)].inc()
        m.latency_by[(self.endpoint, "true" if self.request.stream else "false")].observe(
            time.perf_counter() - self.started)
        m.tokens(tenant.name, self.request.model, self.prompt_tokens, self.completion_tokens)
        if self.quality is not None and self.status == 200 and gw.quality is not None:  # quality hook
            gw.quality.observe(self.quality[1], self.endpoint, self.quality[0], tenant, self.adapter,
                               self.request.model, self.completion_tokens)

    # non-streamed answers (and every error answer) ----------------------------------------------------------
    def json_response(self, status: int, raw: bytes, content_type: str | None) -> Response:
        if status != 200:
            return Response(self.sanitize(raw), status_code=status, media_type=content_type or "application/json")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise EngineProtocolError("The engine answered with invalid JSON.") from None
        if isinstance(obj, dict):
            self.take_usage(obj.get("usage"))
            model = obj.get("model")
            # The engine's bytes can go back as they are (with the internal id replaced) when `model` comes out
            # right that way and no string in them uses a \u escape, the only way a JSON string could spell
            # the internal id other than literally. Otherwise re-serialise with `model` set.
            if (model == self.request.model or (self.adapter is not None and model == self.adapter.internal_id)) \
                    and b"\\u" not in raw:
                return Response(self.sanitize(raw), status_code=200, media_type="application/json")
            obj["model"] = self.request.model
        return Response(self.sanitize(_dump(obj)), status_code=200,
                        media_type="application/json")

    # streamed answers --------------------------------------------------------------------------------------
    def rewrite_event(self, event: bytes) -> bytes | None:
        """One SSE event from the engine -> the event for the client (None: drop it)."""
        data = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        if not data:
            return self.sanitize(event) + b"\n\n" if event.strip() else None
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            # quality hook: the client has the whole answer (the openai SDK closes at [DONE], often before the
            # engine ends its body): a complete stream, not a 499
            self.status = 200
            return b"data: [DONE]\n\n"
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return self.sanitize(event) + b"\n\n"
        if isinstance(obj, dict):
            if "model" in obj:
                obj["model"] = self.request.model
            if obj.get("usage"):
                self.take_usage(obj["usage"])
                if not self.request.wants_usage:
                    if obj.get("choices") == []:
                        return None
                    del obj["usage"]
            if not self.first_token_seen and obj.get("choices"):
                self.first_token_seen = True
                self.gw.metrics.ttft_by[(self.endpoint,)].observe(time.perf_counter() - self.started)
        return b"data: " + self.sanitize(_dump(obj)) + b"\n\n"

    async def events(self, upstream: Upstream) -> AsyncIterator[bytes]:
        """The client's SSE stream, event by event as the engine sends them."""
        buf = b""
        try:
            async for chunk in upstream.chunks():
                buf += chunk
                if b"\r" in buf:
                    buf = buf.replace(b"\r\n", b"\n")
                while (end := buf.find(b"\n\n")) >= 0:
                    event, buf = buf[:end], buf[end + 2:]
                    out = self.rewrite_event(event)
                    if out is not None:
                        yield out
            if buf.strip():
                out = self.rewrite_event(buf.strip(b"\n"))
                if out is not None:
                    yield out
            self.status = 200
        except httpx.HTTPError as exc:
            # The client has had events already: no retry; a clean OpenAI error event ends the stream.
            kind = upstream.broke(exc, self.gw.metrics)
            self.status = 504 if kind == "timeout" else 502
            error = (EngineTimeout if kind == "timeout" else EngineProtocolError)("The engine stream broke off.")
            yield b"data: " + json.dumps(error_body(error.message, error.type_, code=error.code)).encode() + b"\n\n"


class ProxyStream(Response):
    """An SSE response that watches for the client going away and always runs ``on_close`` (shielded).

    Unlike Starlette's ``StreamingResponse`` under ASGI spec 2.4, a disconnect is noticed at once even
    while the engine is silent (a long prefill), so the upstream request is aborted without delay.
    """

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[bool], Awaitable[None]]):
        self.chunks = body
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False
        closed = False

        async def close() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self.on_close(disconnected)

        try:
            async with anyio.create_task_group() as tg:

                async def pump() -> None:
                    await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                    async for chunk in self.chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    # Book-keeping (usage, limits) is done before the client sees the end of the stream.
                    await close()
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    nonlocal disconnected
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    disconnected = True
                    tg.cancel_scope.cancel()

                tg.start_soon(pump)
                tg.start_soon(watch)
        except OSError:
            disconnected = True
        finally:
            await close()


# --- the handler ----------------------------------------------------------------------------------------------
async def proxy_completion(gw: Gateway, tenant: Tenant, request: Request, endpoint: str) -> Response:
    """Serve one completion request for ``tenant``; see the module docstring."""
    started = time.perf_counter()
    try:
        body = await read_body(request, gw.settings.max_request_bytes)
    except GatewayError as exc:
        gw.metrics.requests_by[(tenant.name, endpoint, exc.status)].inc()
        raise
    return await forward_completion(gw, tenant, body, endpoint, started)


async def forward_completion(gw: Gateway, tenant: Tenant, body: bytes, endpoint: str, started: float) -> Response:
    """Serve one completion request whose ``body`` has been read (under the size cap) since ``started``."""
    settings = gw.settings
    try:
        req = parse_completion_request(body, endpoint, settings)
        adapter = None
        if req.model != settings.base_model_id:
            adapter = await resolve_adapter(gw, tenant, req.model)
            if adapter is None:
                raise ModelNotFound(req.model)
            req.payload["model"] = adapter.internal_id
        gw.limiter.acquire(tenant.id, max_concurrency=tenant.max_concurrency,
                           tokens_per_minute=tenant.tokens_per_minute)
    except GatewayError as exc:
        gw.metrics.requests_by[(tenant.name, endpoint, exc.status)].inc()
        raise
    flight = Flight(gw, tenant, endpoint, req, adapter, started)
    quality_id = gw.quality.tag(req.payload) if gw.quality is not None else None  # quality hook
    try:
        upstream = await gw.engines.send(ENDPOINTS[endpoint], json.dumps(req.payload).encode(),
                                         adapter_id=adapter.internal_id if adapter else None, stream=req.stream)
    except GatewayError as exc:
        flight.finish(exc.status)
        raise
    except BaseException:
        flight.finish(500)
        raise
    response = upstream.response
    if quality_id is not None:  # quality hook
        flight.quality = (quality_id, upstream.url)
    if response.status_code == 200 and req.stream:

        async def on_close(disconnected: bool) -> None:
            await upstream.close()
            flight.finish(CLIENT_CLOSED if disconnected and flight.status != 200 else None)

        return ProxyStream(flight.events(upstream), on_close)
    try:
        raw = await response.aread()
        out = flight.json_response(response.status_code, raw, response.headers.get("content-type"))
    except httpx.TimeoutException:
        flight.finish(504)
        raise EngineTimeout("The engine did not answer in time.") from None
    except httpx.HTTPError:
        flight.finish(502)
        raise EngineProtocolError("The engine connection broke before the answer was complete.") from None
    except GatewayError as exc:
        flight.finish(exc.status)
        raise
    finally:
        await upstream.close()
    flight.finish(response.status_code)
    return out
