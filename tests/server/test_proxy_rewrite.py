"""Request checks and SSE event rewriting, without HTTP."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from server.upstream import UpstreamResponse
from server.errors import InvalidRequest
from server.metrics import GatewayMetrics
from server.proxy import CompletionRequest, Flight, parse_completion_request, prompt_size
from server.registry import Adapter, Tenant
from server.routing import ReplicaRouter
from server.settings import Settings

SETTINGS = Settings(_env_file=None, max_prompt_chars=10, max_n=2)


def test_stream_always_asks_usage_of_engine_and_remembers_what_client_wanted():
    req = parse_completion_request(b'{"model":"m","prompt":"p","stream":true}', "completions", SETTINGS)
    assert req.stream and not req.wants_usage and req.payload["stream_options"] == {"include_usage": True}
    req = parse_completion_request(
        b'{"model":"m","prompt":"p","stream":true,"stream_options":{"include_usage":true}}', "completions", SETTINGS)
    assert req.wants_usage


def test_absent_max_tokens_is_left_to_the_engine():
    req = parse_completion_request(b'{"model":"m","prompt":"p"}', "completions", SETTINGS)
    assert "max_tokens" not in req.payload


@pytest.mark.parametrize("payload,size", [
    ({"prompt": "abc"}, 3), ({"prompt": ["ab", "c"]}, 3), ({"prompt": [1, 2, 3, 4]}, 4), ({"prompt": [[1, 2], [3]]}, 3),
])
def test_prompt_size_of_completions(payload, size):
    assert prompt_size("completions", payload) == size


def test_prompt_size_of_chat_counts_text_parts():
    msgs = [{"role": "user", "content": "abc"}, {"role": "user", "content": [{"type": "text", "text": "de"},
                                                                           {"type": "image_url"}]}]
    assert prompt_size("chat.completions", {"messages": msgs}) == 5


@pytest.mark.parametrize("payload", [{"prompt": None}, {"prompt": [None]}, {"prompt": []}, {"prompt": "x" * 11},
                                     {"prompt": "x", "n": 3}, {"prompt": "x", "best_of": 0},
                                     {"prompt": "x", "max_tokens": True}, {"prompt": "x", "stream_options": 1,
                                                                          "stream": True}])
def test_bad_payloads_are_rejected(payload):
    with pytest.raises(InvalidRequest):
        parse_completion_request(json.dumps({"model": "m", **payload}).encode(), "completions", SETTINGS)


class _Gw:
    """Just what Flight.events touches: metrics."""

    def __init__(self) -> None:
        self.metrics = GatewayMetrics(max_adapter_labels=10, base_model_id="base")


def _flight(model: str, internal: str, wants_usage: bool):
    adapter = Adapter(tenant_id=1, name=model, internal_id=internal, base_model="base", r=4, top_k=2,
                      routing="signed", bytes=1, sha256="0", created=0)
    req = CompletionRequest(payload={}, model=model, stream=True, wants_usage=wants_usage)
    return Flight(_Gw(), Tenant(id=1, name="t", created=0), "completions", req, adapter, 0.0)  # type: ignore[arg-type]


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
