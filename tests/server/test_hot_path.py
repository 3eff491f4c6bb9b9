"""The completion hot path's pieces: the fast path's body reader, the engine requests it builds, the engine
client that keeps no cookies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from starlette.requests import ClientDisconnect

from server.errors import PayloadTooLarge
from server.fastpath import receive_body
from server.transport import EngineClient, RequestBuilder

from .helpers import assert_openai_error

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
    assert run(receive_body(_receiver(_body(b"abc", False)), b"3", 3)) == b"abc"
    with pytest.raises(PayloadTooLarge):  # declared too large: refused before reading
        run(receive_body(_receiver(), b"11", 10))
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
