"""Proxying the completion routes (:data:`COMPLETION_ROUTES`) to an engine.

Per request (:func:`serve_completion`): authenticate; admit against the tenant's limits (a concurrency slot,
a positive token balance) before the body is read; read the body under the size cap; check it against the
request policy (:mod:`server.request_policy`); map the tenant-facing ``model`` to the internal adapter id
(its stored files checked, :mod:`server.integrity`) and set the tenant's prefix-cache salt; reserve the
request's worst-case tokens; wait for a fair slot at the engines (:mod:`server.fair_admission`) and register
the adapter's flight (:mod:`server.inflight`); send it to a replica; hand the answer back with ``model`` set
to what the caller sent (every SSE chunk too; an internal id never leaves). Streams pass through event by
event; when the client disconnects the upstream connection is closed, which makes vLLM abort the request.
Whatever happens, :meth:`Flight.finish` runs once: the slots are released and the tenant is charged what the
request used.
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
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from pydantic_core import from_json

from server.adapters import resolve_adapter
from server.deps import authenticate
from server.errors import (
    EngineProtocolError,
    EngineTimeout,
    EngineUnavailable,
    GatewayError,
    ModelNotFound,
    PayloadTooLarge,
    error_body,
    internal_error_response,
)
from server.gateway import Gateway
from server.inflight import AdapterDeleted, RequestGuard
from server.integrity import ensure_servable
from server.registry import Adapter, Tenant
from server.request_policy import CompletionRequest
from server.upstream import UpstreamResponse

log = logging.getLogger("flylora.gateway.proxy")

#: The completion routes: path (the same on the gateway and on the engine) -> endpoint label (in metrics).
COMPLETION_ROUTES = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}
#: endpoint label -> path
ENGINE_PATHS = {endpoint: path for path, endpoint in COMPLETION_ROUTES.items()}
CLIENT_CLOSED = 499  # status recorded in metrics when the client went away mid-stream
#: Statuses after which an engine may have worked on a request that reported no usage: charged its prompt.
WORKED_WITHOUT_USAGE = frozenset({CLIENT_CLOSED, 500, 502, 504})
#: The last event of a stream cut by the gateway's shutdown (its grace period ran out).
SHUTDOWN_EVENT = b"data: " + json.dumps(error_body(
    "The gateway is shutting down and its grace period for running requests ran out; retry the request.",
    "server_error", code="server_shutting_down")).encode() + b"\n\n"


def _load(raw: bytes) -> Any:
    """An engine's JSON: pydantic-core's parser, or the standard library's for what it refuses that an engine
    may still send (a lone surrogate escape); ``ValueError`` if neither reads it."""
    try:
        return from_json(raw)
    except ValueError:
        try:
            return json.loads(raw)
        except RecursionError:
            raise ValueError("nested too deeply") from None


def _dump(obj: Any) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: keep it escaped
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


async def receive_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The whole request body from ASGI messages, or :class:`PayloadTooLarge` as soon as it passes ``limit``
    bytes (or declares more in Content-Length); :class:`ClientDisconnect` if the client goes away."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit}.")
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


# --- one request in flight ------------------------------------------------------------------------------------
@dataclass
class Flight:
    """Book-keeping of one admitted request (it holds a concurrency slot from its creation); :meth:`finish`
    runs exactly once, whatever happens, and gives the slot back."""

    gw: Gateway
    tenant: Tenant
    endpoint: str
    started: float
    request: CompletionRequest | None = None
    adapter: Adapter | None = None
    reserved: int = 0  # tokens held in the tenant's bucket
    sent: bool = False  # the request went to an engine
    usage_seen: bool = False  # the engine's usage of the whole request
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: a stream's usage so far, per choice index: (its prompt's tokens, its tokens so far)
    partial: dict[int, tuple[int, int]] = field(default_factory=dict)
    status: int = 500
    first_token_seen: bool = False
    done: bool = False
    quality: tuple[str, str] | None = None  # quality hook: (engine request id, engine url)
    guard: RequestGuard | None = None  # reliability: fair-admission slot and adapter flight, released in finish
    engine_failed: bool = False  # the engine answered 5xx (the client got 503): it may have worked on it
    internal: bytes = field(default=b"", init=False)
    public: bytes = field(default=b"", init=False)

    def __post_init__(self) -> None:
        self.gw.metrics.in_flight_by[(self.tenant.name,)].inc()
        if self.adapter is not None and self.request is not None:
            self.internal, self.public = self.adapter.internal_id.encode(), self.request.model.encode()

    async def forward(self, body: bytes, receive: Receive | None = None) -> Response:
        """Check ``body``, send it to an engine and answer; raises :class:`GatewayError` on failure.
        ``receive``: the request's, to notice a client that hangs up while it waits for a slot."""
        gw, tenant = self.gw, self.tenant
        req = self.request = await gw.policy.parse_async(body, self.endpoint)
        if req.model != gw.settings.base_model_id:
            self.adapter = await resolve_adapter(gw, tenant, req.model)
            if self.adapter is None:
                raise ModelNotFound(req.model)
            if gw.integrity is not None:  # reliability: the adapter's stored files are intact
                await ensure_servable(gw.integrity, gw.registry, self.adapter)
            req.payload["model"] = self.adapter.internal_id
            self.internal, self.public = self.adapter.internal_id.encode(), req.model.encode()
        req.payload["cache_salt"] = gw.cache_salts(tenant.id)
        quality_id = gw.quality.tag(req.payload) if gw.quality is not None else None  # quality hook
        gw.limiter.reserve(tenant.id, req.reservation, tokens_per_minute=tenant.tokens_per_minute)
        self.reserved = req.reservation
        adapter_id = self.adapter.internal_id if self.adapter else None
        # reliability: a fair slot at the engines, the adapter's flight (server/fair_admission.py, inflight.py)
        guard = self.guard = await RequestGuard.enter(gw.admission, gw.flights, tenant.id, adapter_id, req.model,
                                                      receive)
        self.sent = True
        upstream = await guard.answer(gw.upstream.send(ENGINE_PATHS[self.endpoint], json.dumps(req.payload).encode(),
                                                       adapter_id=adapter_id, stream=req.stream))
        response = upstream.response
        if quality_id is not None:  # quality hook
            self.quality = (quality_id, upstream.url)
        if response.status_code == 200 and req.stream:
            guard.streaming(upstream)

            async def on_close(disconnected: bool) -> None:
                try:
                    await upstream.close()
                finally:
                    self.finish(CLIENT_CLOSED if disconnected and self.status != 200 else None)

            return ProxyStream(self.events(upstream), on_close)
        try:
            raw = await response.aread()
            out = self.json_response(response.status_code, raw, response.headers.get("content-type"))
        except httpx.TimeoutException:
            raise EngineTimeout("The engine did not answer in time.") from None
        except httpx.HTTPError:
            raise EngineProtocolError("The engine connection broke before the answer was complete.") from None
        finally:
            await upstream.close()
        self.status = response.status_code
        return out

    def sanitize(self, raw: bytes) -> bytes:
        """Replace the internal id by the caller's model name anywhere in an engine answer."""
        return raw.replace(self.internal, self.public) if self.internal else raw

    def take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            try:
                self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                self.completion_tokens = int(usage.get("completion_tokens") or 0)
                self.usage_seen = True
            except (TypeError, ValueError):
                log.warning("ignoring malformed usage from the engine: %r", usage)

    def take_partial_usage(self, choices: Any, usage: Any) -> None:
        """A stream chunk's usage: vLLM reports, for the choice in the chunk, its prompt's tokens and the tokens
        it produced so far."""
        try:
            prompt, produced = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            for choice in choices:
                self.partial[int(choice.get("index") or 0)] = (prompt, produced)
        except (AttributeError, TypeError, ValueError):
            log.warning("ignoring malformed usage from the engine: %r", usage)

    def used(self) -> int:
        """Tokens to charge: the engine's usage; for a stream cut short, what each choice produced so far plus
        its prompt; with neither, the prompt's estimate when the engine may have worked on it (a client gone,
        an engine failure), else nothing (refused before an engine saw it, or the engine refused it)."""
        if not self.usage_seen and self.partial and self.request is not None:
            per_prompt = self.request.choices_per_prompt
            prompts: dict[int, int] = {}
            for index, (prompt, produced) in self.partial.items():
                prompts[index // per_prompt] = prompt
                self.completion_tokens += produced
            self.prompt_tokens = sum(prompts.values())
            self.partial.clear()
            self.usage_seen = True
        if self.usage_seen:
            return self.prompt_tokens + self.completion_tokens
        if self.sent and self.request is not None and (self.status in WORKED_WITHOUT_USAGE or self.engine_failed):
            return self.request.prompt_tokens
        return 0

    def finish(self, status: int | None = None) -> None:
        if self.done:
            return
        self.done = True
        if status is not None:
            self.status = status
        gw, tenant, m = self.gw, self.tenant, self.gw.metrics
        if self.guard is not None:
            self.guard.release()
        gw.limiter.release(tenant.id)
        gw.limiter.settle(tenant.id, reserved=self.reserved, used=self.used(),
                          tokens_per_minute=tenant.tokens_per_minute)
        m.in_flight_by[(tenant.name,)].dec()
        m.requests_by[(tenant.name, self.endpoint, self.status)].inc()
        if self.sent and self.request is not None:
            m.latency_by[(self.endpoint, "true" if self.request.stream else "false")].observe(
                time.perf_counter() - self.started)
            m.tokens(tenant.name, self.request.model, self.prompt_tokens, self.completion_tokens)
            if self.quality is not None and self.status == 200 and gw.quality is not None:  # quality hook
                gw.quality.observe(self.quality[1], self.endpoint, self.quality[0], tenant, self.adapter,
                                   self.request.model, self.completion_tokens)

    # non-streamed answers (and every error answer) ----------------------------------------------------------
    def json_response(self, status: int, raw: bytes, content_type: str | None) -> Response:
        if status >= 500:  # reliability: the engine's internals stay in the log; the client gets a clean 503
            log.warning("engine answered HTTP %d for %s: %s", status, self.endpoint, raw[:300])
            self.engine_failed = True
            raise EngineUnavailable(f"The engine could not serve the request (HTTP {status}); retry shortly.")
        if status != 200:
            return Response(self.sanitize(raw), status_code=status, media_type=content_type or "application/json")
        try:
            obj = _load(raw)
        except ValueError:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
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
            return b"data: [DONE]\n\n"
        try:
            obj = _load(payload)
        except ValueError:
            return self.sanitize(event) + b"\n\n"
        if isinstance(obj, dict):
            req = self.request
            if "model" in obj:
                obj["model"] = req.model
            if obj.get("usage"):
                # The engine sends usage on every chunk (so a stream cut short is charged what it produced);
                # the client gets the final usage chunk if it asked, and usage on every chunk if it asked.
                choices = obj.get("choices")
                if not choices:
                    self.take_usage(obj["usage"])
                    self.partial.clear()
                    if not req.wants_usage:
                        return None
                else:
                    self.take_partial_usage(choices, obj["usage"])
                    if not req.wants_continuous_usage:
                        del obj["usage"]
            if not self.first_token_seen and obj.get("choices"):
                self.first_token_seen = True
                self.gw.metrics.ttft_by[(self.endpoint,)].observe(time.perf_counter() - self.started)
        return b"data: " + self.sanitize(_dump(obj)) + b"\n\n"

    async def events(self, upstream: UpstreamResponse) -> AsyncIterator[bytes]:
        """The client's SSE stream, event by event as the engine sends them."""
        buf = b""
        try:
            async for chunk in upstream.chunks():
                buf += chunk
                if b"\r" in buf:
                    buf = buf.replace(b"\r\n", b"\n")
                while (end := buf.find(b"\n\n")) >= 0:
                    event, buf = buf[:end], buf[end + 2:]
                    if event.strip() == b"data: [DONE]":
                        self.status = 200  # complete: a client that closes on [DONE] did not cut it short
                    out = self.rewrite_event(event)
                    if out is not None:
                        yield out
            if buf.strip():
                out = self.rewrite_event(buf.strip(b"\n"))
                if out is not None:
                    yield out
            self.status = 200
        except httpx.HTTPError as exc:
            if self.guard is not None and self.guard.cut:  # reliability: the adapter was deleted meanwhile
                self.status = AdapterDeleted.status
                cut = AdapterDeleted(self.request.model)
                yield b"data: " + json.dumps(error_body(cut.message, cut.type_, param=cut.param,
                                                        code=cut.code)).encode() + b"\n\n"
                return
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
        started = ended = False

        async def close() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            with anyio.CancelScope(shield=True):
                try:
                    aclose = getattr(self.chunks, "aclose", None)
                    if aclose is not None:
                        await aclose()
                finally:
                    await self.on_close(disconnected)

        try:
            async with anyio.create_task_group() as tg:

                async def pump() -> None:
                    nonlocal started, ended
                    await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                    started = True
                    async for chunk in self.chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    # Book-keeping (usage, limits) is done before the client sees the end of the stream.
                    await close()
                    ended = True
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
            if started and not ended and not disconnected:
                # reliability: cut by the server (the end of the shutdown grace): a clean last event, then the end
                with anyio.move_on_after(2, shield=True):
                    await send({"type": "http.response.body", "body": SHUTDOWN_EVENT, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})


# --- the handler ----------------------------------------------------------------------------------------------
async def serve_completion(gw: Gateway, endpoint: str, authorization: str | None, content_length: str | None,
                           receive: Receive) -> Response:
    """Serve one completion request: the one entry of both the fast path and the FastAPI routes.

    Every failure becomes its answer here (a :class:`GatewayError`'s, or the one 500 body for anything
    unexpected); only :class:`ClientDisconnect` (nobody to answer) propagates. Once admitted, the request's
    :class:`Flight` is finished on every exit path (error, disconnect, cancellation), or by the stream it
    was handed to.
    """
    try:
        tenant = await authenticate(gw, authorization)
        try:
            gw.limiter.acquire(tenant.id, max_concurrency=tenant.max_concurrency,
                               tokens_per_minute=tenant.tokens_per_minute)
        except GatewayError as exc:
            gw.metrics.requests_by[(tenant.name, endpoint, exc.status)].inc()
            raise
    except GatewayError as exc:
        return exc.response()
    except Exception:
        log.exception("unhandled error on %s", ENGINE_PATHS[endpoint])
        return internal_error_response()
    flight = Flight(gw, tenant, endpoint, time.perf_counter())
    streaming = False
    try:
        body = await receive_body(receive, content_length, gw.settings.max_request_bytes)
        response = await flight.forward(body, receive)
        streaming = isinstance(response, ProxyStream)  # it finishes the flight when it closes
        return response
    except GatewayError as exc:
        flight.status = exc.status
        return exc.response()
    except ClientDisconnect:
        flight.status = CLIENT_CLOSED
        raise
    except Exception:
        log.exception("unhandled error on %s", ENGINE_PATHS[endpoint])
        return internal_error_response()
    finally:
        if not streaming:
            flight.finish()
