"""What measuring energies costs: throughput with the engine's per-token energies on and off, side by side.

    python -m loadtests.energy_cost [--pairs 6] [--phase 20] [--out docs/bench]

One engine + gateway (``loadtests.stack``: bf16, 16 slots, 64 seqs), 16 FlyLoRA adapters (r=32, k=8, all seven
projections), the engine benchmark's closed-loop load (16 clients, uniform over the 16 adapters, 32 output
tokens with ``ignore_eos``). Measuring is paused and resumed at run time (``POST /flylora/energy/control``),
so both arms run on the same warm engine, alternating ``off, on, off, on, ...`` in ``--pairs`` pairs of
``--phase`` seconds (alternation cancels slow drifts of a shared machine's load). Reported:

- output tokens/s of every phase; the ratio on/off of the medians and of each adjacent pair;
- the worker's own time spent measuring (the plugin's counter) per second of load: the engine is the
  bottleneck and runs its steps back to back, so this fraction is the throughput it costs, measured without
  the noise of other processes on the machine.

Writes ``<out>/energy_cost.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

from flylora_runtime.paths import REPO_ROOT, data_dir

from loadtests.generator import LoadSpec, run_load
from loadtests.report import machine, summarize
from loadtests.stack import FLYLORA_FULL, Stack, ensure_adapters
from loadtests.workload import Lengths

N_ADAPTERS = 16


def _log(msg: str) -> None:
    print(f"[energy-cost] {msg}", file=sys.stderr, flush=True)


async def control(engine: str, enabled: bool | None = None) -> dict:
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        r = await client.post(engine + "/flylora/energy/control",
                              json={} if enabled is None else {"enabled": enabled})
        r.raise_for_status()
        return r.json()


async def measure(args: argparse.Namespace) -> dict:
    names = [f"fly-{i:04d}" for i in range(N_ADAPTERS)]
    folders = ensure_adapters(FLYLORA_FULL, N_ADAPTERS)
    with Stack(data_dir() / "loadtests" / "stack-energy") as stack:
        engine = f"http://{stack.engine_config.host}:{stack.engine_config.port}"
        await stack.upload(names, folders)
        spec = LoadSpec(url=stack.gateway_url, api_key=stack.tenant_key, models=names, popularity="uniform",
                        concurrency=args.concurrency, duration_s=args.phase, output_tokens=Lengths(32, 32),
                        progress=False, max_requests=5000, drain_timeout_s=240.0, label="energy")
        await run_load(replace(spec, duration_s=args.phase / 2, seed=999, label="warm-up"))  # every adapter loaded
        phases = []
        for i in range(2 * args.pairs):
            on = i % 2 == 1
            await control(engine, on)
            before, t0, load = await control(engine), time.monotonic(), os.getloadavg()[0]
            summary = summarize(await run_load(replace(spec, seed=i, label=f"energy {'on' if on else 'off'}")))
            after, wall = await control(engine), time.monotonic() - t0
            phase = {"energy": on, "output_tokens_per_s": summary["output_tokens_per_s"], "ok": summary["ok"],
                     "issued": summary["issued"], "failed": summary["failed"], "wall_s": wall, "loadavg": load,
                     "measuring_busy_s": after["busy_seconds"] - before["busy_seconds"],
                     "measured_steps": after["steps"] - before["steps"]}
            phase["measuring_share"] = phase["measuring_busy_s"] / wall
            phases.append(phase)
            _log(f"phase {i + 1}/{2 * args.pairs} energy {'on ' if on else 'off'}: "
                 f"{phase['output_tokens_per_s']:.1f} tok/s, {phase['ok']}/{phase['issued']} ok, measuring "
                 f"{100 * phase['measuring_share']:.2f}% of the time, load avg {load:.1f}")
        await control(engine, True)
    off = [p["output_tokens_per_s"] for p in phases if not p["energy"]]
    on = [p["output_tokens_per_s"] for p in phases if p["energy"]]
    pairs = [b / a for a, b in zip(off, on)]
    on_phases = [p for p in phases if p["energy"]]
    share = sum(p["measuring_busy_s"] for p in on_phases) / sum(p["wall_s"] for p in on_phases)
    steps = sum(p["measured_steps"] for p in on_phases)
    return {
        "machine": machine(), "command": "python -m loadtests.energy_cost " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {"adapters": N_ADAPTERS, "adapter": "FlyLoRA r=32 k=8, all seven projections",
                     "concurrency": args.concurrency, "output_tokens": 32, "phase_s": args.phase,
                     "pairs": args.pairs, "engine": stack.describe()},
        "phases": phases,
        "off_median_tokens_per_s": statistics.median(off), "on_median_tokens_per_s": statistics.median(on),
        "on_over_off_medians": statistics.median(on) / statistics.median(off),
        "on_over_off_pairs": pairs, "on_over_off_pairs_median": statistics.median(pairs),
        "measuring_share_of_engine_time": share,
        "measuring_ms_per_step": 1000 * sum(p["measuring_busy_s"] for p in on_phases) / steps if steps else None,
        "failed": sum(p["failed"] for p in phases),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.energy_cost", description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=6, help="off/on pairs of phases (default 6)")
    p.add_argument("--phase", type=float, default=20.0, help="seconds of load per phase (default 20)")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (default 16)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "bench", help="folder for energy_cost.json")
    args = p.parse_args(argv)
    result = asyncio.run(measure(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "energy_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"energy off: median {result['off_median_tokens_per_s']:.1f} output tok/s; on: "
          f"{result['on_median_tokens_per_s']:.1f} ({result['on_over_off_medians']:.3f}x; adjacent pairs median "
          f"{result['on_over_off_pairs_median']:.3f}x, range {min(result['on_over_off_pairs']):.3f}-"
          f"{max(result['on_over_off_pairs']):.3f}); the engine spent "
          f"{100 * result['measuring_share_of_engine_time']:.2f}% of its time measuring "
          f"({result['measuring_ms_per_step']:.2f} ms per step); {result['failed']} failed requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
