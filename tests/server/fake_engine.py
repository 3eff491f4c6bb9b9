"""A TEST DOUBLE of the engine: a tiny FastAPI app mimicking vLLM's OpenAI server, for gateway tests only.

It is not vLLM and runs no model. It answers like vLLM does on the routes the gateway uses
(``/v1/chat/completions``, ``/v1/completions`` with SSE and ``stream_options.include_usage``, ``/health``,
``/v1/unload_lora_adapter``, the plugin's ``/flylora/energy``; ``stream_options.continuous_usage_stats``: usage so far on every chunk), resolves adapter ids from the adapter store like vLLM's LoRA resolver (404
for an id with no folder), echoes the ``model`` it was sent (an internal id), and records everything it
receives so tests can check what the gateway sent upstream.

Knobs, as extra JSON fields of a request (the test gateways let them through with
``passthrough_request_fields``):
``fake_sleep_s`` (wait before answering), ``fake_chunk_delay_s`` (wait between SSE chunks),
``fake_status`` (answer this HTTP error, with the model id in the message, as vLLM's errors do),
``fake_completion_tokens`` (generate this many tokens, fewer than ``max_tokens``: a stop sequence met),
``fake_tail_delay_s`` (wait between a stream's ``[DONE]`` and the end of its body),
``fake_energy`` (the request's mean token energy that ``/flylora/energy`` reports; default -10).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

INTERNAL_ID = re.compile(r"^fl-[0-9a-f]{32}$")
#: The request fields the test double reads as knobs.
FAKE_ENGINE_KNOBS = ("fake_sleep_s", "fake_chunk_delay_s", "fake_status", "fake_completion_tokens", "fake_tail_delay_s",
                     "fake_energy")


@dataclass
class FakeEngineState:
    base_model: str = "SmolLM2-135M-Instruct"
    store: Path | None = None
    health_status: int = 200
    unload_status: int | None = None  # force this status on unload
    unload_delay_s: float = 0.0  # wait this long before answering an unload
    requests: list[dict[str, Any]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    unloads: list[str] = field(default_factory=list)
    loaded: set[str] = field(default_factory=set)
    #: per-request token statistics by answer id (served once by /flylora/energy, like the plugin)
    energies: dict[str, dict[str, Any]] = field(default_factory=dict)
    energy_queries: list[dict[str, Any]] = field(default_factory=list)
    energy_supported: bool = True
    energy_failures: int = 0  # answer this many /flylora/energy calls with a 500
    #: make every stream break off (connection dropped): "before_first_chunk" or "after_first_chunk"
    break_streams: str | None = None
    #: answer every completion request with this HTTP error (an engine shutting down, a dead engine core)
    force_status: int | None = None
    #: completion requests being answered now, and the most at once
    in_flight: int = 0
    max_in_flight: int = 0

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if path is None or r["path"] == path]


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


def _words(seed_text: str, count: int) -> list[str]:
    h = int(hashlib.sha256(seed_text.encode()).hexdigest()[:8], 16)
    return [f" w{(h + 7 * i) % 101}" for i in range(count)]


def create_fake_engine(state: FakeEngineState) -> FastAPI:
    app = FastAPI(title="fake vLLM engine (test double)")
    app.state.fake = state

    def resolve(model: str) -> JSONResponse | None:
        if model == state.base_model:
            return None
        if INTERNAL_ID.fullmatch(model) and (state.store is None or (
                (state.store / model).is_dir() and not (state.store / model / "DELETED").exists())):
            state.loaded.add(model)
            return None
        return _error(404, f"The model `{model}` does not exist.", "model")

    async def complete(request: Request, kind: str) -> Any:
        body = await request.json()
        rid = str(body.get("request_id") or uuid.uuid4().hex)  # vLLM answers with <prefix>-<request_id>
        state.requests.append({"path": request.url.path, "body": body, "id": rid,
                               "headers": dict(request.headers)})
        model = body.get("model", "")
        if state.force_status is not None:
            return _error(state.force_status, "EngineCore encountered an issue.")
        if body.get("fake_status"):
            return _error(int(body["fake_status"]), f"Engine refused the request for model `{model}`.")
        missing = resolve(model)
        if missing is not None:
            return missing
        if body.get("fake_sleep_s"):
            await asyncio.sleep(float(body["fake_sleep_s"]))
        prompt = json.dumps(body.get("messages") if kind == "chat" else body.get("prompt"))
        count = int(body.get("fake_completion_tokens") or body.get("max_completion_tokens") or body.get("max_tokens")
                    or 8)
        n = int(body.get("n") or 1)
        words = _words(prompt, count)
        usage = {"prompt_tokens": len(prompt) // 4 + 1, "completion_tokens": count * n,
                 "total_tokens": len(prompt) // 4 + 1 + count * n}
        created = int(time.time())
        cid = ("chatcmpl-" if kind == "chat" else "cmpl-") + rid
        # per-request token statistics like the plugin's /flylora/energy: `fake_energy` in the body, or -10
        state.energies[cid] = {"tokens": count * n, "sequences": n, "energy": float(body.get("fake_energy", -10.0)),
                               "max_prob": 0.5, "entropy": 1.5}
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if not body.get("stream"):
            if kind == "chat":
                choices = [{"index": i, "message": {"role": "assistant", "content": "".join(words)},
                            "logprobs": None, "finish_reason": "length"} for i in range(n)]
            else:
                choices = [{"index": i, "text": "".join(words), "logprobs": None, "finish_reason": "length"}
                           for i in range(n)]
            state.completed.append(rid)
            return {"id": cid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage}

        delay = float(body.get("fake_chunk_delay_s") or 0)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        continuous = include_usage and bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
        produced: dict[int, int] = {}  # per choice, as vLLM counts continuous usage

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            for c in choices:
                produced[c["index"]] = produced.get(c["index"], 0) + bool(
                    c.get("text") or (c.get("delta") or {}).get("content"))
            data = {"id": cid, "object": obj + ".chunk" if kind == "chat" else obj, "created": created,
                    "model": model, "choices": choices, **extra}
            if continuous and "usage" not in data and choices:
                done = produced[choices[0]["index"]]
                data["usage"] = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": done,
                                 "total_tokens": usage["prompt_tokens"] + done}
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        async def events() -> Any:
            finished = False
            try:
                if state.break_streams == "before_first_chunk":
                    raise ConnectionAbortedError("fake engine: stream broken before its first chunk")
                for i in range(n):
                    if i == 0 and state.break_streams == "after_first_chunk" and kind != "chat":
                        yield chunk([{"index": 0, "text": words[0], "logprobs": None, "finish_reason": None}])
                        raise ConnectionAbortedError("fake engine: stream broken after its first chunk")
                    if kind == "chat":
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                    for j, w in enumerate(words):
                        if delay:
                            await asyncio.sleep(delay)
                        last = j == len(words) - 1
                        reason = "length" if last else None
                        if kind == "chat":
                            yield chunk([{"index": i, "delta": {"content": w}, "logprobs": None,
                                          "finish_reason": reason}])
                        else:
                            yield chunk([{"index": i, "text": w, "logprobs": None, "finish_reason": reason}])
                if include_usage:
                    yield chunk([], usage=usage)
                yield b"data: [DONE]\n\n"
                if body.get("fake_tail_delay_s"):  # vLLM may end its body a moment after [DONE]
                    await asyncio.sleep(float(body["fake_tail_delay_s"]))
                finished = True
            finally:
                (state.completed if finished else state.aborted).append(rid)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def counted(request: Request, kind: str) -> Any:
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            response = await complete(request, kind)
        except BaseException:
            state.in_flight -= 1
            raise
        if not isinstance(response, StreamingResponse):
            state.in_flight -= 1
            return response
        inner = response.body_iterator

        async def body() -> Any:
            try:
                async for part in inner:
                    yield part
            finally:
                state.in_flight -= 1

        response.body_iterator = body()
        return response

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await counted(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await counted(request, "completions")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> Any:
        body = await request.json()
        name = body.get("lora_name", "")
        state.unloads.append(name)
        await asyncio.sleep(state.unload_delay_s)
        if state.unload_status is not None:
            return _error(state.unload_status, "forced failure")
        if name not in state.loaded:
            return _error(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        state.loaded.discard(name)
        return JSONResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/flylora/energy")
    async def energy(request: Request) -> Any:
        body = await request.json()
        state.energy_queries.append(body)
        if not state.energy_supported:
            return _error(404, "Not Found")
        if state.energy_failures > 0:
            state.energy_failures -= 1
            return _error(500, "fake engine: energies unavailable")
        results, missing = {}, []
        for item in body["requests"]:
            found = state.energies.pop(item["id"], None)
            if found is None:
                missing.append(item["id"])
            else:
                results[item["id"]] = found
        return {"results": results, "missing": missing}

    @app.get("/health")
    async def health() -> Any:
        return JSONResponse({}, status_code=state.health_status)

    return app
