"""SSE event rewriting (model names, usage), without HTTP."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from server.metrics import GatewayMetrics
from server.proxy import Flight, _dump
from server.registry import Adapter, Tenant
from server.request_policy import CompletionRequest
from server.routing import ReplicaRouter
from server.upstream import UpstreamResponse

def test_lone_surrogates_from_the_engine_are_kept_escaped():
    assert _dump({"text": "\ud800"}) == b'{"text":"\\ud800"}'
    assert _dump({"text": "é"}) == '{"text":"é"}'.encode()


class _Gw:
    """Just what Flight.events touches: metrics."""

    def __init__(self) -> None:
        self.metrics = GatewayMetrics(max_adapter_labels=10, base_model_id="base")


def _flight(model: str, internal: str, wants_usage: bool, continuous: bool = False):
    adapter = Adapter(tenant_id=1, name=model, internal_id=internal, base_model="base", r=4, top_k=2,
                      routing="signed", bytes=1, sha256="0", created=0)
    req = CompletionRequest(payload={}, model=model, stream=True, wants_usage=wants_usage,
                            wants_continuous_usage=continuous, prompt_tokens=1, max_tokens=4, sequences=1)
    return Flight(_Gw(), Tenant(id=1, name="t", created=0), "completions", 0.0,  # type: ignore[arg-type]
                  request=req, adapter=adapter)


def _run_events(flight, body) -> list[bytes]:
    async def main() -> list[bytes]:
        response = httpx.Response(200, content=body)
        upstream = UpstreamResponse(url="e", response=response, router=ReplicaRouter(["e"]), rest=response.aiter_bytes())
        return [out async for out in flight.events(upstream)]

    return anyio.run(main)


async def _pieces(pieces: list[bytes]):
    for p in pieces:
        yield p


def test_events_reframe_split_and_crlf_chunks_and_rewrite_model():
    internal = "fl-" + "a" * 32
    events = [
        {"id": "1", "model": internal, "choices": [{"index": 0, "text": "é"}]},
        {"id": "1", "model": internal, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}},
    ]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events) + b"data: [DONE]\r\n\r\n"
    pieces = [stream[i:i + 7] for i in range(0, len(stream), 7)]  # boundaries fall anywhere, even inside \r\n
    flight = _flight("mine", internal, wants_usage=False)
    out = _run_events(flight, _pieces(pieces))
    assert out[-1] == b"data: [DONE]\n\n" and len(out) == 2  # the usage-only chunk was not asked for
    first = json.loads(out[0].removeprefix(b"data: "))
    assert first == {"id": "1", "model": "mine", "choices": [{"index": 0, "text": "é"}]}
    assert (flight.prompt_tokens, flight.completion_tokens, flight.status) == (2, 1, 200)
    assert all(internal.encode() not in o for o in out)


def test_events_keep_usage_when_asked_and_report_a_broken_stream():
    flight = _flight("mine", "fl-" + "b" * 32, wants_usage=True)
    usage = b'data: {"model":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    assert json.loads(flight.rewrite_event(usage.strip())[6:])["usage"] == {"prompt_tokens": 1, "completion_tokens": 1}

    async def broken():
        yield b'data: {"choices":[{"text":"a"}]}\n\n'
        raise httpx.ReadError("engine died")

    out = _run_events(flight, broken())
    assert json.loads(out[-1][6:])["error"]["code"] == "bad_engine_response" and flight.status == 502


@pytest.mark.parametrize("include_usage,continuous", [(False, False), (True, False), (True, True)])
def test_usage_on_every_chunk_is_counted_and_shown_only_where_asked(include_usage, continuous):
    """The engine is always asked for usage on every chunk: the flight knows what a stream produced so far."""
    def chunk(text: str | None, done: int) -> dict:
        choices = [] if text is None else [{"index": 0, "text": text}]
        return {"id": "1", "model": "x", "choices": choices,
                "usage": {"prompt_tokens": 3, "completion_tokens": done, "total_tokens": 3 + done}}

    events = [chunk("a", 1), chunk("b", 2)]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    flight = _flight("mine", "fl-" + "c" * 32, wants_usage=include_usage, continuous=continuous)
    out = [json.loads(o[6:]) for o in _run_events(flight, _pieces([body]))]
    assert [("usage" in o) for o in out] == [continuous, continuous]
    assert flight.used() == 5 and (flight.prompt_tokens, flight.completion_tokens) == (3, 2)
    final = flight.rewrite_event(b"data: " + json.dumps(chunk(None, 2)).encode())
    assert (final is not None) == include_usage


def test_a_cut_stream_with_several_choices_and_prompts_is_charged_every_choice_and_each_prompt_once():
    """vLLM's usage on a chunk is that choice's: its prompt's tokens and what it produced so far."""
    flight = _flight("mine", "fl-" + "d" * 32, wants_usage=False)
    flight.request.choices_per_prompt = 2  # two prompts (of 3 and 5 tokens), n = 2: choices 0-1 and 2-3
    for index, prompt, produced in [(0, 3, 1), (1, 3, 1), (0, 3, 2), (2, 5, 1), (3, 5, 4), (1, 3, 3)]:
        event = {"model": "x", "choices": [{"index": index, "text": "t"}],
                 "usage": {"prompt_tokens": prompt, "completion_tokens": produced}}
        assert "usage" not in json.loads(flight.rewrite_event(b"data: " + json.dumps(event).encode())[6:])
    assert flight.used() == (3 + 5) + (2 + 3 + 1 + 4)
    assert (flight.prompt_tokens, flight.completion_tokens) == (8, 10)


def test_engine_json_the_parser_refuses_is_read_leniently_or_refused_cleanly():
    from server.proxy import _load

    assert _load(b'{"text": "\\ud800"}') == {"text": "\ud800"}  # a lone surrogate escape: read as it is
    with pytest.raises(ValueError):
        _load(b"[" * 5000 + b"]" * 5000)  # deeper than either parser goes: a ValueError, never RecursionError
