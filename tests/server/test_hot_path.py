"""The completion hot path's pieces: the fast path's body reader, the engine requests it builds, the engine
client that keeps no cookies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from starlette.requests import ClientDisconnect

from server.errors import PayloadTooLarge
from server.proxy import receive_body
from server.transport import EngineClient, RequestBuilder

from tests.server.helpers import assert_openai_error

BASE = "SmolLM2-135M-Instruct"


def _receiver(*messages: dict):
    queue = list(messages)

    async def receive() -> dict:
        return queue.pop(0)

    return receive


def _body(chunk: bytes, more: bool) -> dict:
    return {"type": "http.request", "body": chunk, "more_body": more}


def test_receive_body_joins_chunks_and_enforces_the_limit_as_it_reads():
    run = asyncio.run
    assert run(receive_body(_receiver(_body(b'{"a":', True), _body(b"", True), _body(b"1}", False)), None, 10)) \
        == b'{"a":1}'
    assert run(receive_body(_receiver(_body(b"abc", False)), "3", 3)) == b"abc"
    with pytest.raises(PayloadTooLarge):  # declared too large: refused before reading
        run(receive_body(_receiver(), "11", 10))
    with pytest.raises(PayloadTooLarge):  # no (or a lying) Content-Length: refused when the bytes pass it
        run(receive_body(_receiver(_body(b"x" * 6, True), _body(b"x" * 6, True)), None, 10))
    with pytest.raises(ClientDisconnect):
        run(receive_body(_receiver(_body(b"x", True), {"type": "http.disconnect"}), None, 10))


@pytest.mark.parametrize("fast_path", [True, False])
def test_chunked_body_over_the_limit_is_413_with_fake_engine(make_engine, make_gateway, fast_path):
    engine = make_engine()
    gw = make_gateway([engine.url], completion_fast_path=fast_path, max_request_bytes=1000)
    _, key = gw.new_tenant()

    def chunks(n: int) -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"model": "' + BASE.encode() + b'", "prompt": "'
        for _ in range(n):
            yield b"x" * 100
        yield b'"}'

    with gw.client(key) as c:
        assert_openai_error(c.post("/v1/completions", content=chunks(20),
                                   headers={"content-type": "application/json"}), 413)
        assert not engine.state.requests
        assert c.post("/v1/completions", content=chunks(5), headers={"content-type": "application/json"}
                      ).status_code == 200


def test_engine_requests_carry_what_httpx_would_send():
    builder = RequestBuilder({"content-type": "application/json", "authorization": "Bearer engine-key"},
                             httpx.Timeout(7.0))
    built = builder.post("http://127.0.0.1:8100", "/v1/completions", b'{"model":"m"}')
    reference = httpx.Request("POST", "http://127.0.0.1:8100/v1/completions", content=b'{"model":"m"}',
                              headers={"content-type": "application/json", "authorization": "Bearer engine-key"})
    assert dict(built.headers) == dict(reference.headers)
    assert built.headers["content-length"] == "13" and built.headers["host"] == "127.0.0.1:8100"
    assert built.content == b'{"model":"m"}' and built.url == reference.url
    assert built.extensions["timeout"] == httpx.Timeout(7.0).as_dict()
    again = builder.post("http://127.0.0.1:8100", "/v1/completions", b"{}")
    assert again.headers["content-length"] == "2" and built.headers["content-length"] == "13"


def test_engine_client_never_replays_an_engines_cookies():
    seen: list[str | None] = []

    def engine(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("cookie"))
        return httpx.Response(200, headers={"set-cookie": "route=replica-1; Path=/"}, json={})

    async def main() -> None:
        async with EngineClient(transport=httpx.MockTransport(engine)) as client:
            for _ in range(2):
                await client.post("http://127.0.0.1:8100/v1/completions", json={})
            assert not client.cookies
        async with EngineClient(transport=httpx.MockTransport(engine), cookies={"given": "1"}) as client:
            for _ in range(2):  # cookies the client was given are sent, the engine's are not added
                await client.post("http://127.0.0.1:8100/v1/completions", json={})

    asyncio.run(main())
    assert seen == [None, None, "given=1", "given=1"]


def _serve_once(answers: dict[bytes, bytes]):
    """An asyncio HTTP/1.1 server answering GET <path> with a fixed raw response (for the transport)."""

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\r\n\r\n" in self.buf:
                head, _, self.buf = self.buf.partition(b"\r\n\r\n")
                self.transport.write(answers[head.split(b" ")[1]])  # type: ignore[attr-defined]

    return Answer


@pytest.mark.parametrize("path", [b"/json", b"/gzip", b"/sse"])
def test_engine_transport_passes_json_encoded_and_streamed_answers_over_pooled_connections(path):
    pytest.importorskip("httpx_aiohttp")
    import gzip
    import json

    from server.transport import EngineTransport

    payload = json.dumps({"model": "m", "usage": {"prompt_tokens": 1}}).encode()
    packed = gzip.compress(payload)
    sse = b"data: 1\n\n"
    answers = {
        b"/json": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(payload), payload),
        b"/gzip": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(packed), packed),
        b"/sse": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"%x\r\n%s\r\n0\r\n\r\n" % (len(sse), sse),
    }

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_serve_once(answers), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with EngineClient(transport=EngineTransport(trust_env=False)) as client:
                for _ in range(2):  # the second over the pooled connection
                    async with client.stream("GET", f"http://127.0.0.1:{port}{path.decode()}") as r:
                        body = b"".join([chunk async for chunk in r.aiter_bytes()])
                    assert r.status_code == 200
                    assert body == (sse if path == b"/sse" else payload)
        finally:
            server.close()

    asyncio.run(main())


def _answer_flight(model: str, internal: str | None):
    import time

    from server.metrics import GatewayMetrics
    from server.proxy import Flight
    from server.registry import Adapter, Tenant
    from server.request_policy import CompletionRequest

    class Gw:
        metrics = GatewayMetrics(max_adapter_labels=10, base_model_id=BASE)

    adapter = None if internal is None else Adapter(
        tenant_id=1, name=model, internal_id=internal, base_model=BASE, r=4, top_k=2, routing="signed", bytes=1,
        sha256="0", created=0)
    req = CompletionRequest(payload={}, model=model, stream=False, wants_usage=False, wants_continuous_usage=False,
                            prompt_tokens=1, max_tokens=2, sequences=1)
    return Flight(Gw(), Tenant(id=1, name="t", created=0), "completions", time.perf_counter(),  # type: ignore[arg-type]
                  request=req, adapter=adapter)


@pytest.mark.parametrize("case", ["adapter", "base", "escaped", "other_model", "non_ascii"])
def test_non_streamed_answer_carries_the_callers_model_and_never_the_internal_id(case):
    import json

    internal = "fl-" + "c" * 32
    model, engine_model, text = {
        "adapter": ("mine", internal, f"I am {internal}."),  # the engine echoes the id it was sent
        "base": (BASE, BASE, "plain"),
        "escaped": ("mine", internal, f"\u00e9 {internal}"),  # below: sent with \u escapes only
        "other_model": (BASE, "served-name", "plain"),  # an engine naming its model otherwise
        "non_ascii": ("mine", internal, "日本 é"),
    }[case]
    answer = {"id": "x", "model": engine_model, "choices": [{"index": 0, "text": text}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    if case == "escaped":  # every character of the id spelled as \uXXXX: only parsing finds it
        raw = json.dumps(answer, ensure_ascii=True).replace(internal, "".join(f"\\u{ord(c):04x}" for c in internal))
        raw = raw.encode()
    else:
        raw = json.dumps(answer, ensure_ascii=False).encode()
    flight = _answer_flight(model, None if engine_model == BASE or case == "other_model" else internal)
    out = flight.json_response(200, raw, "application/json").body
    got = json.loads(out)
    assert got["model"] == model and internal.encode() not in out and internal not in json.dumps(got)
    assert got["choices"][0]["text"] == text.replace(internal, model)
    assert (flight.prompt_tokens, flight.completion_tokens) == (3, 2)
