"""Graceful shutdown of a real gateway process (``python -m server.cli``) in front of the fake engine test double:
on SIGTERM it stops accepting, lets streams in flight finish within ``FLYLORA_SHUTDOWN_GRACE_S``, cuts what is
left at the end of the grace, and exits 0; after a restart the registry and the store are intact."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import start_fake_engine
from tests.server.fake_engine import FAKE_ENGINE_KNOBS
from tests.server.gateway_process import GatewayProcess
from tests.server.helpers import ADMIN_KEY, adapter_files, upload_form

pytestmark = pytest.mark.timeout(120)


def start_gateway(data: Path, engine_url: str, grace_s: float) -> GatewayProcess:
    return GatewayProcess(data, [engine_url], shutdown_grace_s=grace_s, max_upload_bytes=256 * 1024,
                          passthrough_request_fields=",".join(FAKE_ENGINE_KNOBS)).start()


def read_stream(url: str, key: str, tokens: int, delay: float) -> tuple[int, bool, str | None]:
    """(content events, saw [DONE], the error event's code or a transport error) of one streamed completion."""
    events, done, error = 0, False, None
    try:
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={"model": "kept", "prompt": "x", "max_tokens": tokens,
                                                           "stream": True, "fake_chunk_delay_s": delay}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        obj = json.loads(line[6:])
                        if "error" in obj:
                            error = obj["error"]["code"]
                        elif obj.get("choices"):
                            events += 1
    except httpx.TransportError as exc:
        return events, done, type(exc).__name__
    return events, done, error


@pytest.mark.parametrize("grace_s,tokens,finishes", [(10.0, 20, True), (1.0, 200, False)],
                         ids=["streams_finish_within_the_grace", "streams_cut_at_the_end_of_the_grace"])
def test_sigterm_drains_then_exits_0_and_state_survives_a_restart(tmp_path, grace_s, tokens, finishes):
    engine = start_fake_engine(tmp_path / "adapters")
    gw = start_gateway(tmp_path, engine.url, grace_s)
    try:
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        key = httpx.post(gw.url + "/admin/tenants", json={"name": "acme"}, headers=admin).json()["api_key"]
        config, weights = adapter_files(tmp_path / "src")
        data, files = upload_form("kept", config.read_bytes(), weights.read_bytes())
        r = httpx.post(gw.url + "/v1/adapters", data=data, files=files, headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 201, r.text
        before = sorted(p.name for p in (tmp_path / "adapters").iterdir())
        with ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(read_stream, gw.url, key, tokens, 0.1) for _ in range(3)]
            deadline = time.monotonic() + 10
            while engine.state.in_flight < 3:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            t_term = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(gw.url + "/health", timeout=2)
            code = gw.proc.wait(grace_s + 15)
            exited_s = time.monotonic() - t_term
            results = [s.result(30) for s in streams]
        assert code == 0, gw.log.read_text(errors="replace")[-3000:]
        if finishes:
            assert all(done and n == tokens and err is None for n, done, err in results), results
            assert exited_s < grace_s
        else:
            # cut, never hung: a clean error event ends each stream
            assert all(not done and 0 < n < tokens and err == "server_shutting_down" for n, done, err in results), \
                results
            assert grace_s <= exited_s < grace_s + 10
        assert "timeout graceful shutdown exceeded" in gw.log.read_text(errors="replace") or finishes

        gw = start_gateway(tmp_path, engine.url, grace_s)  # restart: the same registry and store
        assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == before
        with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"}, timeout=30) as c:
            info = c.get("/v1/adapters/kept").json()
            assert info["status"] == "ready", info
            assert c.post("/v1/completions", json={"model": "kept", "prompt": "x", "max_tokens": 2}).status_code == 200
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(15) == 0
    finally:
        gw.stop()
        engine.server.stop()
