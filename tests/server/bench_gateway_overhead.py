"""Benchmark: what the gateway adds on top of calling the engine directly.

Starts a minimal stand-in upstream (a raw asyncio HTTP/1.1 server that answers every request instantly
with a fixed chat completion; a benchmark tool, not a test double of vLLM's behaviour) and a real gateway
(uvicorn + uvloop + httptools, real SQLite registry, as ``flylora-gateway`` runs it) in separate processes,
then measures from this process, with the same client and the same request both ways:

* latency: sequential requests (concurrency 1), p50 / p99, direct vs through the gateway;
* throughput: ``--concurrency`` requests in flight for ``--seconds``, requests/s through the gateway and
  directly, and the CPU time each process spent per request meanwhile (from ``/proc``, Linux).

The client (``--client raw``, the default) is a minimal keep-alive HTTP/1.1 client on uvloop: it sends the
same request bytes an HTTP client would (method, path, host, bearer key, JSON body with Content-Length)
over one connection per worker and checks each answer's status and full Content-Length body. On a 2-core
machine the load generator shares the cores with the gateway, so a lighter client leaves the gateway more
of them, as a separate load-generator machine would; ``--client aiohttp`` measures with aiohttp instead.

Run: ``.venv/bin/python -m tests.server.bench_gateway_overhead [--json out.json]``.
Targets on a 2-core machine: at most 2 ms added at p50, at least 1,000 requests/s through the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flylora_runtime.client import GatewayClient
from flylora_runtime.engine.process import free_port, wait_http

ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "SmolLM2-135M-Instruct",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}).encode()
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: " + str(len(ANSWER)).encode()
            + b"\r\n\r\n" + ANSWER)
HEALTH = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
BODY = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


BENCH_ADMIN_KEY = "bench-admin-key-not-secret-0123456789"


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
    settings = Settings(_env_file=None, data_dir=data_dir, engine_urls=[upstream], admin_key=BENCH_ADMIN_KEY,
                        max_concurrency_per_tenant=10_000, tokens_per_minute_per_tenant=0)
    # As `flylora-gateway` runs it (server/cli.py), with uvloop and httptools.
    uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="error", access_log=False,
                loop="uvloop", http="httptools", proxy_headers=False, server_header=False)


def _free_port() -> int:
    return free_port()


def _wait(url: str) -> None:
    wait_http(url + "/health", timeout=30, interval=0.1)


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


class _RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection sending a fixed request; answers must carry Content-Length."""

    def __init__(self, request: bytes):
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = self.buf[:end].split(b"\r\n")
        length = next((int(line[15:]) for line in lines[1:] if line[:15].lower() == b"content-length:"), None)
        if length is None:
            self.waiter.set_exception(RuntimeError(f"an answer without Content-Length: {lines[0]!r}"))  # type: ignore[union-attr]
            return
        if len(self.buf) < end + 4 + length:
            return
        self.buf = self.buf[end + 4 + length:]
        self.waiter.set_result(int(lines[0].split(b" ", 2)[1]))  # type: ignore[union-attr]

    async def call(self) -> int:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(self.request)  # type: ignore[union-attr]
        return await self.waiter


def _raw_request(url: str, key: str | None) -> bytes:
    host = url.split("://", 1)[1]
    body = json.dumps(BODY).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _raw_connect(url: str, key: str | None) -> _RawConnection:
    host, port = url.split("://", 1)[1].split(":")
    request = _raw_request(url, key)
    _, conn = await asyncio.get_running_loop().create_connection(lambda: _RawConnection(request), host, int(port))
    return conn


async def _sequential_raw(url: str, key: str | None, n: int) -> list[float]:
    conn = await _raw_connect(url, key)
    out = []
    try:
        for i in range(n + 20):
            t = time.perf_counter()
            status = await conn.call()
            dt = time.perf_counter() - t
            if status != 200:
                raise RuntimeError(f"HTTP {status}")
            if i >= 20:  # warm-up
                out.append(dt)
    finally:
        conn.transport.close()  # type: ignore[union-attr]
    return out


async def _throughput_raw(url: str, key: str | None, concurrency: int, seconds: float) -> float:
    conns = [await _raw_connect(url, key) for _ in range(concurrency)]
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(conn: _RawConnection) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            status = await conn.call()
            if status != 200:
                raise RuntimeError(f"HTTP {status}")
            done += 1

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        return done / (time.perf_counter() - start)
    finally:
        for c in conns:
            c.transport.close()  # type: ignore[union-attr]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _measured(run: Any, pids: dict[str, int], coro: Any) -> tuple[float, dict[str, float | None]]:
    """Run a throughput coroutine; req/s and each process's CPU microseconds per request meanwhile."""
    before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.perf_counter()
    rps = run(coro)
    requests = rps * (time.perf_counter() - t0)
    after = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    return rps, {name: None if before[name] is None or after[name] is None or not requests
                 else (after[name] - before[name]) * 1e6 / requests for name in pids}


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="sequential requests per latency run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--client", choices=("raw", "aiohttp"), default="raw", help="load client (see above)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    sequential, throughput = ((_sequential_raw, _throughput_raw) if args.client == "raw"
                              else (_sequential, _throughput))

    ctx = mp.get_context("spawn")
    up_port, gw_port = _free_port(), _free_port()
    upstream, gateway = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as data_dir:
        procs = [ctx.Process(target=_run_upstream, args=(up_port,), daemon=True),
                 ctx.Process(target=_run_gateway, args=(gw_port, upstream, data_dir), daemon=True)]
        for p in procs:
            p.start()
        try:
            _wait(upstream)
            _wait(gateway)
            with GatewayClient(gateway, BENCH_ADMIN_KEY) as admin:
                key = admin.create_tenant("bench")
            import uvloop

            run = uvloop.run
            pids = {"gateway": procs[1].pid, "upstream": procs[0].pid, "client": os.getpid()}
            run(throughput(gateway, key, args.concurrency, 1.0))  # warm-up
            direct = run(sequential(upstream, None, args.requests))
            via = run(sequential(gateway, key, args.requests))
            rps, cpu = _measured(run, pids, throughput(gateway, key, args.concurrency, args.seconds))
            rps_direct, cpu_direct = _measured(run, pids, throughput(upstream, None, args.concurrency, args.seconds))
        finally:
            for p in procs:
                p.terminate()
                p.join(5)
    result = {
        "cpus": os.cpu_count(),
        "direct_p50_ms": _pct(direct, 50), "direct_p99_ms": _pct(direct, 99),
        "gateway_p50_ms": _pct(via, 50), "gateway_p99_ms": _pct(via, 99),
        "added_p50_ms": _pct(via, 50) - _pct(direct, 50), "added_p99_ms": _pct(via, 99) - _pct(direct, 99),
        "gateway_rps": rps, "direct_rps": rps_direct, "concurrency": args.concurrency, "client": args.client,
        "gateway_cpu_us_per_req": cpu["gateway"], "client_cpu_us_per_req": cpu["client"],
        "upstream_cpu_us_per_req": cpu["upstream"], "direct_client_cpu_us_per_req": cpu_direct["client"],
        "load_average_1m_before": load_before, "load_average_1m_after": os.getloadavg()[0],
    }
    for k, v in result.items():
        print(f"{k:>29}: {v:.2f}" if isinstance(v, float) else f"{k:>29}: {v}")
    ok = result["added_p50_ms"] <= 2.0 and rps >= 1000
    print(f"targets (added p50 <= 2 ms, >= 1000 req/s): {'met' if ok else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
