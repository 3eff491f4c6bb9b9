"""Clients that record how every request ended (for the reliability tests and the fairness and soak runs):
status, ``Retry-After``, time to first token, streamed events, ``[DONE]``, the text, the OpenAI error object,
or the transport error. Nothing raises: a request that cannot be accounted for is a finding."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

PROMPT = "Write one sentence about the sea."


@dataclass
class Outcome:
    """One request as its client saw it."""

    tenant: str
    model: str
    stream: bool
    began: float
    ended: float = 0.0
    first_token: float | None = None
    status: int | None = None
    retry_after: str | None = None
    events: int = 0
    done: bool = False
    text: str = ""
    error: dict | None = None
    transport_error: str | None = None
    cancelled: bool = False  # the client hung up on purpose (after ``cancel_after`` events)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and (self.done or not self.stream)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.began


async def request(client: httpx.AsyncClient, tenant: str, key: str, model: str, *, stream: bool, max_tokens: int,
                  prompt: str = PROMPT, live: list[Outcome] | None = None, cancel_after: int | None = None,
                  ignore_eos: bool = True) -> Outcome:
    """One completion; every way it can end is recorded, nothing raises. ``cancel_after``: hang up a stream
    after that many content events; ``ignore_eos``: always ``max_tokens`` tokens (vLLM's extra parameter)."""
    out = Outcome(tenant=tenant, model=model, stream=stream, began=time.monotonic())
    if live is not None:
        live.append(out)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "ignore_eos": ignore_eos}
    headers = {"authorization": f"Bearer {key}"}
    try:
        if not stream:
            r = await client.post("/v1/completions", json=body, headers=headers)
            out.status, out.retry_after = r.status_code, r.headers.get("retry-after")
            payload = r.json()
            if r.status_code == 200:
                out.text = payload["choices"][0]["text"]
                out.first_token = time.monotonic()
            else:
                out.error = payload.get("error")
        else:
            async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                out.status, out.retry_after = r.status_code, r.headers.get("retry-after")
                if r.status_code != 200:
                    out.error = json.loads(await r.aread()).get("error")
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            out.done = True
                            continue
                        obj = json.loads(line[6:])
                        if "error" in obj:
                            out.error = obj["error"]
                        elif obj.get("choices"):
                            if out.first_token is None:
                                out.first_token = time.monotonic()
                            out.events += 1
                            out.text += obj["choices"][0].get("text") or ""
                            if cancel_after is not None and out.events >= cancel_after:
                                out.cancelled = True
                                break
    except httpx.TransportError as exc:
        out.transport_error = f"{type(exc).__name__}: {exc}"
    except (ValueError, KeyError) as exc:
        out.transport_error = f"unreadable answer: {exc!r}"
    out.ended = time.monotonic()
    return out


def async_client(url: str, connections: int = 256, timeout: float = 300) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=connections),
                             trust_env=False)


def run(coro):
    return asyncio.run(coro)
