"""``python -m loadtests.run cold``: cold adapter loads while other requests decode, with and without the
worker's background first loads (flylora_runtime/vllm_plugin/prefetch.py; ``FLYLORA_PREFETCH=0`` turns them
off), in two engine sessions with the default settings.

Per session: base-model load from 8 closed-loop clients (64-token completions) for ``--duration`` seconds
alone (steady), then again while one client requests 12 adapters that are in the store but were never
requested, one after another (``max_tokens`` 1), then (the control) the same arrivals for those adapters
once more, now loaded. Reported: the cold adapters' time to first token, and the base requests' time per
output token steady, during the cold loads and during the control, two ways: each token's own time (the
gap since the token before it, "ITL"; p50, p99: a stall of the engine loop is one long gap) and each
request's mean (TPOT). The issue's bound: the p99 during cold loads within 1.2x of steady. A new request's
prefill joins the decoders' step whatever its adapter, so the control tells that gap apart from a load's. Before that, on
the idle engine: 16 other never-requested adapters, each asked cold, then warm, with a base request before
them (``max_tokens`` 1, one at a time, prompts of 64 words), so a cold first token can be read against the same engine's warm
and base ones (idle_ttft_s). Every single request has a prompt of its own, so none is answered from the
prefix cache. Writes ``cold_benchmark.json`` into ``--out``.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace

from flylora_runtime.paths import data_dir

from loadtests.generator import run_load
from loadtests.report import machine, percentile, summarize, write_json
from loadtests.stack import FLYLORA_FULL, Stack, ensure_adapters
from loadtests.workload import Lengths

N_COLD = 12
N_IDLE = 16  # p50 of 16 triples: the 150 ms bound is within a few ms of the measured p50, so 6 were too few
CLIENTS = 8


async def _session(b, base_model: str, prefetch: bool) -> dict:
    os.environ["FLYLORA_PREFETCH"] = "1" if prefetch else "0"
    workdir = data_dir() / "loadtests" / f"stack-cold-{'on' if prefetch else 'off'}"
    names = [f"cold-{i:04d}" for i in range(N_COLD)]
    idle_names = [f"idle-{i:04d}" for i in range(N_IDLE)]
    with Stack(workdir, max_loras=0, max_cpu_loras=0, max_num_seqs=0, dtype="bfloat16") as stack:
        await stack.upload(names + idle_names, ensure_adapters(FLYLORA_FULL, N_COLD + N_IDLE))
        spec = b.spec(stack, [base_model], "base", popularity="single", concurrency=CLIENTS)
        await run_load(replace(spec, max_requests=CLIENTS, output_tokens=Lengths(2, 2), progress=False))  # warm
        idle = await _idle_ttfts(spec, base_model, idle_names)
        load_steady = os.getloadavg()[0]
        steady = summarize(await run_load(spec))
        ttfts, failures, warm_ttfts = [], [], []

        async def arrivals(kind: str, seed: int, into: list) -> None:
            await asyncio.sleep(2.0)  # let the base clients reach decode
            for i, name in enumerate(names):
                rec = await _one_request(spec, name, f"{kind} {name}", seed=seed + i)
                (into.append(rec.ttft) if rec.ok and rec.ttft is not None else failures.append(rec.error))
                await asyncio.sleep(0.5)

        load_during = os.getloadavg()[0]
        during, _ = await asyncio.gather(run_load(spec), arrivals("cold", 2000, ttfts))
        during = summarize(during)
        # The control: the same arrivals again, now for adapters the engine holds (new prompts): what a new
        # request's prefill alone does to the other streams' token gaps, without any load.
        during_warm, _ = await asyncio.gather(run_load(spec), arrivals("warm", 3000, warm_ttfts))
        during_warm = summarize(during_warm)
    return {"prefetch": prefetch, "idle_ttft_s": idle, "cold_ttft_s": ttfts, "cold_ttft_p50_s": percentile(ttfts, 50),
            "cold_ttft_p99_s": percentile(ttfts, 99), "cold_failures": failures,
            "steady": steady, "during_cold": during, "loadavg_steady": load_steady, "loadavg_during": load_during,
            "during_warm": during_warm, "warm_ttft_p50_s": percentile(warm_ttfts, 50) if warm_ttfts else None,
            "tpot_p99_during_over_steady": (during["tpot_s"]["p99"] or 0) / (steady["tpot_s"]["p99"] or 1),
            "itl_p99_during_over_steady": (during["itl_s"]["p99"] or 0) / (steady["itl_s"]["p99"] or 1),
            "itl_p99_during_warm_over_steady": (during_warm["itl_s"]["p99"] or 0) / (steady["itl_s"]["p99"] or 1),
            "tpot_p99_during_warm_over_steady": (during_warm["tpot_s"]["p99"] or 0) / (steady["tpot_s"]["p99"] or 1)}


async def _one_request(spec, model: str, label: str, seed: int):
    """One request for ``model`` alone (``max_tokens`` 1, its prompt drawn from ``seed``); its record."""
    res = await run_load(replace(spec, models=[model], label=label, max_requests=1, concurrency=1, duration_s=600,
                                 output_tokens=Lengths(1, 1), progress=False, seed=seed))
    return res.records[0]


#: Words per prompt on the idle engine: the middle of the load's 32-96, the same for base, cold and warm. A
#: first token grows with the prompt (~1 ms per token here), so drawing each request's length from 32-96
#: spread single TTFTs by +-25 ms and moved p50s of 16 by ~10 ms between the three kinds.
IDLE_PROMPT_WORDS = 64


async def _idle_ttfts(spec, base_model: str, names: list[str]) -> dict:
    """On the idle engine, per adapter: a base request, the adapter cold, the adapter warm (one at a time, each
    with a prompt of its own of :data:`IDLE_PROMPT_WORDS` words)."""
    spec = replace(spec, prompt_words=Lengths(IDLE_PROMPT_WORDS, IDLE_PROMPT_WORDS))
    out: dict[str, list] = {"base": [], "cold": [], "warm": []}
    for j, name in enumerate(names):
        for k, (key, model) in enumerate((("base", base_model), ("cold", name), ("warm", name))):
            rec = await _one_request(spec, model, f"idle {model}", seed=1000 + 3 * j + k)
            out[key].append(rec.ttft if rec.ok else None)
            await asyncio.sleep(0.2)
    for key in ("base", "cold", "warm"):
        got = [t for t in out[key] if t is not None]
        out[key + "_p50"] = percentile(got, 50) if got else None
        out[key + "_failed"] = len(out[key]) - len(got)
    return out


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f} ms"


async def run_cold(b, base_model: str) -> dict:
    t0 = time.monotonic()
    sessions = {}
    for prefetch in (True, False):
        sessions["on" if prefetch else "off"] = await _session(b, base_model, prefetch)
    os.environ.pop("FLYLORA_PREFETCH", None)
    out = {"machine": machine(), "command": b.meta.get("command"), "sessions": sessions,
           "settings": {"duration_s": b.duration_s, "clients": CLIENTS, "output_tokens": b.output_tokens,
                        "cold_adapters": N_COLD}, "session_s": time.monotonic() - t0}
    b.out.mkdir(parents=True, exist_ok=True)
    write_json(b.out / "cold_benchmark.json", out)
    for key, s in sessions.items():
        idle = s["idle_ttft_s"]
        print(f"prefetch {key}: idle engine TTFT p50 base {_ms(idle['base_p50'])}, warm adapter {_ms(idle['warm_p50'])}, "
              f"cold adapter {_ms(idle['cold_p50'])}", flush=True)
        print(f"prefetch {key}: cold TTFT p50 {s['cold_ttft_p50_s'] or float('nan'):.3f} s p99 "
              f"{s['cold_ttft_p99_s'] or float('nan'):.3f} s ({len(s['cold_failures'])} failed); base TPOT p50/p99 "
              f"steady {s['steady']['tpot_s']['p50'] * 1e3:.0f}/{s['steady']['tpot_s']['p99'] * 1e3:.0f} ms, during "
              f"cold loads {s['during_cold']['tpot_s']['p50'] * 1e3:.0f}/{s['during_cold']['tpot_s']['p99'] * 1e3:.0f} ms "
              f"({s['tpot_p99_during_over_steady']:.2f}x); per-token gap (ITL) p50/p99 steady "
              f"{s['steady']['itl_s']['p50'] * 1e3:.0f}/{s['steady']['itl_s']['p99'] * 1e3:.0f} ms, during "
              f"{s['during_cold']['itl_s']['p50'] * 1e3:.0f}/{s['during_cold']['itl_s']['p99'] * 1e3:.0f} ms "
              f"({s['itl_p99_during_over_steady']:.2f}x); load avg {s['loadavg_steady']:.1f}/{s['loadavg_during']:.1f}",
              flush=True)
        w = s["during_warm"]
        print(f"prefetch {key}: control, the same arrivals for adapters already loaded: TTFT p50 "
              f"{_ms(s['warm_ttft_p50_s'])}; base TPOT p99 {w['tpot_s']['p99'] * 1e3:.0f} ms "
              f"({s['tpot_p99_during_warm_over_steady']:.2f}x), ITL p99 {w['itl_s']['p99'] * 1e3:.0f} ms "
              f"({s['itl_p99_during_warm_over_steady']:.2f}x)", flush=True)
    return out
