"""A request's concurrency slot and token reservation are given back on every exit path, cancellation
included: ``serve_completion`` driven in-process, with the upstream pool replaced by test doubles (an engine
that hangs, one whose answer breaks the gateway's rewriting, one whose connection hangs on close)."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest

from server.gateway import Gateway
from server.proxy import serve_completion
from server.routing import ReplicaRouter
from server.settings import Settings
from server.upstream import UpstreamResponse

BASE = "SmolLM2-135M-Instruct"
BODY = json.dumps({"model": BASE, "prompt": "x" * 40, "max_tokens": 10}).encode()


def _receive(body: bytes):
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class _Answer(UpstreamResponse):
    """An engine answer whose close hangs until cancelled (a connection that will not shut)."""

    async def close(self) -> None:
        await anyio.sleep_forever()


async def _gateway(tmp: Path) -> tuple[Gateway, str, int]:
    settings = Settings(_env_file=None, data_dir=tmp, engine_urls=["http://127.0.0.1:9"], admin_key="policy-admin-key-not-secret-0123456789",
                        tokens_per_minute_per_tenant=1000)
    gw = Gateway.build(settings)
    tenant, key = gw.registry.create_tenant("t", max_concurrency=1)
    return gw, key, tenant.id


def _engine_answer(gw: Gateway, cls: type[UpstreamResponse] = UpstreamResponse, **json_body) -> UpstreamResponse:
    body = json_body or {"model": BASE, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 3}}
    return cls(url="e", response=httpx.Response(200, json=body), router=ReplicaRouter(["e"]))


@pytest.mark.parametrize("case", ["engine hangs, request cancelled", "answer breaks the rewrite",
                                  "close hangs, request cancelled", "normal"])
def test_slot_and_reservation_are_given_back(tmp_path, monkeypatch, case):
    async def main() -> None:
        gw, key, tid = await _gateway(tmp_path)
        try:
            if case == "engine hangs, request cancelled":
                async def send(*_a, **_k):
                    await anyio.sleep_forever()
            elif case == "answer breaks the rewrite":
                async def send(*_a, **_k):
                    return _engine_answer(gw)

                def broken(*_a, **_k):
                    raise RuntimeError("a bug in the answer rewriting")
                monkeypatch.setattr("server.proxy.Flight.json_response", broken)
            elif case == "close hangs, request cancelled":
                async def send(*_a, **_k):
                    return _engine_answer(gw, _Answer)
            else:
                async def send(*_a, **_k):
                    return _engine_answer(gw)
            monkeypatch.setattr(gw.upstream, "send", send)
            gw.limiter.clock = lambda: 0.0
            result: list = []
            async with anyio.create_task_group() as tg:
                async def call() -> None:
                    result.append(await serve_completion(gw, "completions", f"Bearer {key}", None, _receive(BODY)))

                tg.start_soon(call)
                await anyio.sleep(0.2)
                if "cancelled" in case:
                    assert gw.limiter.in_flight == {tid: 1}
                    assert gw.limiter.buckets[tid].level == 1000 - (10 + 10)  # the reservation is held
                    tg.cancel_scope.cancel()
            assert gw.limiter.in_flight == {}
            assert gw.metrics.in_flight_by[("t",)]._value.get() == 0
            level = gw.limiter.buckets[tid].level
            if case == "normal":
                assert result[0].status_code == 200 and level == 1000 - 13  # settled against the usage
            elif case == "close hangs, request cancelled":
                assert level == 1000 - 13  # the answer had been read: its usage is charged
            elif case == "answer breaks the rewrite":
                assert result[0].status_code == 500
                assert json.loads(result[0].body)["error"]["message"] == "Internal server error."
                assert level == 1000 - 10  # the engine worked: its prompt is charged
            else:
                assert level == 1000 - 10  # cancelled while the engine worked: its prompt is charged
        finally:
            await gw.aclose()

    anyio.run(main)
