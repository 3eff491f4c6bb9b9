"""CPU instructions the gateway executes per proxied request: a measure that does not move with machine load.

The same set-up as ``bench_gateway_overhead`` (stand-in upstream, gateway as the CLI runs it, the raw load
client, the same request), but the gateway runs under valgrind's callgrind with instrumentation switched
on only while ``--requests`` requests pass (after a warm-up). Prints user-space instructions per request
(kernel work, e.g. socket writes, is not counted). On a shared machine, where requests/s and CPU time
swing with other jobs, this is how two versions of the gateway are compared.

Run: ``.venv/bin/python -m tests.server.bench_gateway_instructions [--requests 1000]`` (needs valgrind;
about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time

from flylora_runtime.client import GatewayClient
from flylora_runtime.engine.process import ChildProcess
from tests.server import bench_gateway_overhead as bench

GATEWAY = """
import sys
from tests.server.bench_gateway_overhead import _run_gateway
_run_gateway(int(sys.argv[1]), sys.argv[2], sys.argv[3])
"""


async def _load(url: str, key: str, requests: int, concurrency: int) -> None:
    conns = [await bench._raw_connect(url, key) for _ in range(concurrency)]

    async def worker(conn: bench._RawConnection, n: int) -> None:
        for _ in range(n):
            if (status := await conn.call()) != 200:
                raise RuntimeError(f"HTTP {status}")

    try:
        await asyncio.gather(*(worker(c, requests // concurrency + (i < requests % concurrency))
                               for i, c in enumerate(conns)))
    finally:
        for c in conns:
            c.transport.close()  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("needs valgrind (callgrind, callgrind_control)", file=sys.stderr)
        return 2
    import uvloop

    up_port, gw_port = bench._free_port(), bench._free_port()
    upstream, gateway = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    up = mp.get_context("spawn").Process(target=bench._run_upstream, args=(up_port,), daemon=True)
    up.start()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        # under valgrind the start takes a while
        gw = ChildProcess("gateway", ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                      f"--callgrind-out-file={out}", sys.executable, "-c", GATEWAY, str(gw_port),
                                      upstream, tmp], log_path=os.path.join(tmp, "gateway.log"), cwd=os.getcwd(),
                          ready_url=gateway + "/health", ready_timeout=600, grace=60)
        gw.spawn()
        try:
            bench._wait(upstream)
            gw.wait_ready()
            with GatewayClient(gateway, bench.BENCH_ADMIN_KEY) as admin:
                key = admin.create_tenant("bench")
            uvloop.run(_load(gateway, key, 200, args.concurrency))  # warm-up, not counted
            def control(*command: str) -> None:
                subprocess.run(["callgrind_control", *command, str(gw.pid)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            control("-i", "on")
            uvloop.run(_load(gateway, key, args.requests, args.concurrency))
            control("-i", "off")
            control("-d")
            time.sleep(1)
            total = 0
            for path in glob.glob(out + "*"):
                with open(path) as fh:
                    for line in fh:
                        if line.startswith(("summary:", "totals:")):
                            total = max(total, int(line.split()[1]))
        finally:
            gw.stop()
            up.terminate()
    print(f"gateway instructions per request: {total / args.requests / 1e3:.0f} k "
          f"({args.requests} requests, {args.concurrency} connections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
