"""What measuring energies costs: throughput with the engine's per-token statistics off, on and full, side by side.

    python -m loadtests.energy_cost [--rounds 4] [--phase 20] [--out docs/bench]

One engine + gateway (``loadtests.stack``: bf16, 16 slots, 64 seqs), 16 FlyLoRA adapters (r=32, k=8, all seven
projections), the engine benchmark's closed-loop load (16 clients, uniform over the 16 adapters, 32 output
tokens with ``ignore_eos``). What is measured is switched at run time (``POST /flylora/energy/control``), so
every arm runs on the same warm engine: ``off`` (nothing), ``on`` (energy and max probability, the default),
``full`` (also the entropy), in ``--rounds`` rounds of ``--phase`` seconds each (alternation cancels slow
drifts of a shared machine's load). Reported:

- output tokens/s of every phase; the ratios on/off and full/off of the medians and within each round;
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


ARMS = {"off": {"enabled": False}, "on": {"enabled": True, "entropy": False},
        "full": {"enabled": True, "entropy": True}}


async def control(engine: str, body: dict | None = None) -> dict:
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        r = await client.post(engine + "/flylora/energy/control", json=body or {})
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
        plan = [arm for _ in range(args.rounds) for arm in ARMS]
        for i, arm in enumerate(plan):
            await control(engine, ARMS[arm])
            before, t0, load = await control(engine), time.monotonic(), os.getloadavg()[0]
            summary = summarize(await run_load(replace(spec, seed=i, label=f"energy {arm}")))
            after, wall = await control(engine), time.monotonic() - t0
            phase = {"arm": arm, "round": i // len(ARMS), "output_tokens_per_s": summary["output_tokens_per_s"],
                     "ok": summary["ok"], "issued": summary["issued"], "failed": summary["failed"], "wall_s": wall,
                     "loadavg": load, "measuring_busy_s": after["busy_seconds"] - before["busy_seconds"],
                     "measured_steps": after["steps"] - before["steps"]}
            phase["measuring_share"] = phase["measuring_busy_s"] / wall
            phases.append(phase)
            _log(f"phase {i + 1}/{len(plan)} {arm:4s}: {phase['output_tokens_per_s']:.1f} tok/s, "
                 f"{phase['ok']}/{phase['issued']} ok, measuring {100 * phase['measuring_share']:.2f}% of the "
                 f"time, load avg {load:.1f}")
        await control(engine, ARMS["on"])
    tps = {arm: [p["output_tokens_per_s"] for p in phases if p["arm"] == arm] for arm in ARMS}
    out: dict = {
        "machine": machine(), "command": "python -m loadtests.energy_cost " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {"adapters": N_ADAPTERS, "adapter": "FlyLoRA r=32 k=8, all seven projections",
                     "concurrency": args.concurrency, "output_tokens": 32, "phase_s": args.phase,
                     "rounds": args.rounds, "engine": stack.describe()},
        "phases": phases, "failed": sum(p["failed"] for p in phases),
        "median_tokens_per_s": {arm: statistics.median(v) for arm, v in tps.items()},
    }
    for arm in ("on", "full"):
        mine = [p for p in phases if p["arm"] == arm]
        steps = sum(p["measured_steps"] for p in mine)
        out[arm] = {
            "over_off_medians": statistics.median(tps[arm]) / statistics.median(tps["off"]),
            "over_off_per_round": [b / a for a, b in zip(tps["off"], tps[arm])],
            "measuring_share_of_engine_time": sum(p["measuring_busy_s"] for p in mine) / sum(p["wall_s"] for p in mine),
            "measuring_ms_per_step": 1000 * sum(p["measuring_busy_s"] for p in mine) / steps if steps else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.energy_cost", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4, help="rounds of off, on, full phases (default 4)")
    p.add_argument("--phase", type=float, default=20.0, help="seconds of load per phase (default 20)")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (default 16)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "bench", help="folder for energy_cost.json")
    args = p.parse_args(argv)
    result = asyncio.run(measure(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "energy_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    med = result["median_tokens_per_s"]
    print(f"output tok/s, medians of {args.rounds} phases: off {med['off']:.1f}, on {med['on']:.1f}, "
          f"full {med['full']:.1f}; {result['failed']} failed requests")
    for arm in ("on", "full"):
        r = result[arm]
        rounds = ", ".join(f"{x:.3f}" for x in r["over_off_per_round"])
        print(f"  {arm:4s}: {r['over_off_medians']:.3f}x off (per round {rounds}); the engine spent "
              f"{100 * r['measuring_share_of_engine_time']:.2f}% of its time measuring "
              f"({r['measuring_ms_per_step']:.2f} ms per step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
