"""Benchmark: what the gateway adds on top of calling the engine directly.

Starts a minimal stand-in upstream (a raw asyncio HTTP/1.1 server that answers every request instantly
with a fixed chat completion; a benchmark tool, not a test double of vLLM's behaviour) and a real gateway
(uvicorn + uvloop + httptools, real SQLite registry) in separate processes, then measures with one
aiohttp client process (httpx's client is too slow to load even the stand-in):

* latency: sequential requests (concurrency 1), p50 / p99, direct vs through the gateway;
* throughput: ``--concurrency`` requests in flight for ``--seconds``, requests/s through the gateway.

Run: ``.venv/bin/python -m tests.server.bench_gateway_overhead [--json out.json]``.
Targets on a 2-core machine: at most 2 ms added at p50, at least 1,000 requests/s through the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "SmolLM2-135M-Instruct",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}).encode()
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: " + str(len(ANSWER)).encode()
            + b"\r\n\r\n" + ANSWER)
HEALTH = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
BODY = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


class _Instant(asyncio.Protocol):
    """Answers each complete HTTP/1.1 request (headers + Content-Length body) at once, keep-alive."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(HEALTH if head.startswith(b"get /health") else RESPONSE)  # type: ignore[attr-defined]


def _run_upstream(port: int) -> None:
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Instant, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    uvloop.run(main())


def _run_gateway(port: int, upstream: str, data_dir: str) -> None:
    import uvicorn

    from server.app import create_app
    from server.settings import Settings
    from tests.server.helpers import write_base_model

    write_base_model(Path(data_dir) / "models" / "SmolLM2-135M-Instruct")
    settings = Settings(_env_file=None, data_dir=data_dir, engine_urls=[upstream], admin_key="bench-admin",
                        max_concurrency_per_tenant=10_000, tokens_per_minute_per_tenant=0)
    # As `flylora-gateway` runs it (server/cli.py), with uvloop and httptools.
    uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="error", access_log=False,
                loop="uvloop", http="httptools", proxy_headers=False, server_header=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


async def _sequential(url: str, key: str | None, n: int) -> list[float]:
    import aiohttp

    headers = {"authorization": f"Bearer {key}"} if key else {}
    out = []
    async with aiohttp.ClientSession(base_url=url, headers=headers) as c:
        for i in range(n + 20):
            t = time.perf_counter()
            async with c.post("/v1/chat/completions", json=BODY) as r:
                await r.read()
                status = r.status
            dt = time.perf_counter() - t
            if status != 200:
                raise RuntimeError(f"HTTP {status}")
            if i >= 20:  # warm-up
                out.append(dt)
    return out


async def _throughput(url: str, key: str | None, concurrency: int, seconds: float) -> float:
    import aiohttp

    headers = {"authorization": f"Bearer {key}"} if key else {}
    done = 0
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=url, headers=headers, connector=connector) as c:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with c.post("/v1/chat/completions", json=BODY) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}")
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="sequential requests per latency run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    ctx = mp.get_context("spawn")
    up_port, gw_port = _free_port(), _free_port()
    upstream, gateway = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    with tempfile.TemporaryDirectory() as data_dir:
        procs = [ctx.Process(target=_run_upstream, args=(up_port,), daemon=True),
                 ctx.Process(target=_run_gateway, args=(gw_port, upstream, data_dir), daemon=True)]
        for p in procs:
            p.start()
        try:
            _wait(upstream)
            _wait(gateway)
            key = httpx.post(gateway + "/admin/tenants", json={"name": "bench"},
                             headers={"authorization": "Bearer bench-admin"}).json()["api_key"]
            import uvloop

            run = uvloop.run
            direct = run(_sequential(upstream, None, args.requests))
            via = run(_sequential(gateway, key, args.requests))
            rps = run(_throughput(gateway, key, args.concurrency, args.seconds))
            rps_direct = run(_throughput(upstream, None, args.concurrency, args.seconds))
        finally:
            for p in procs:
                p.terminate()
                p.join(5)
    result = {
        "cpus": os.cpu_count(),
        "direct_p50_ms": _pct(direct, 50), "direct_p99_ms": _pct(direct, 99),
        "gateway_p50_ms": _pct(via, 50), "gateway_p99_ms": _pct(via, 99),
        "added_p50_ms": _pct(via, 50) - _pct(direct, 50), "added_p99_ms": _pct(via, 99) - _pct(direct, 99),
        "gateway_rps": rps, "direct_rps": rps_direct, "concurrency": args.concurrency,
    }
    for k, v in result.items():
        print(f"{k:>16}: {v:.2f}" if isinstance(v, float) else f"{k:>16}: {v}")
    ok = result["added_p50_ms"] <= 2.0 and rps >= 1000
    print(f"targets (added p50 <= 2 ms, >= 1000 req/s): {'met' if ok else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
