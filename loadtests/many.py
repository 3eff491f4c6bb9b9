"""``python -m loadtests.run many`` and ``churn``: thousands of adapters on one engine with its default settings.

The stack starts as ``make serve`` starts it (no slot, cache or sequence flags; bf16), as in
:mod:`loadtests.defaults`; only the gateway's per-tenant adapter quotas are lifted (the defaults allow 100
adapters and 2 uploads in progress per tenant), since one tenant holds them all here.

- ``many``: ``--adapters`` (default 10,000) small FlyLoRA adapters (:data:`TINY`: q_proj + v_proj, r=4,
  top_k=1, bf16 tensors, 0.48 MB each, so 10,000 take 4.8 GB in the generation cache and as much again in the
  store) are uploaded through ``POST /v1/adapters`` (``UPLOAD_PARALLEL`` at a time; the rate is recorded per
  chunk, so a registry that slows as it grows shows). The gateway's lookups (``GET /v1/adapters/{name}``,
  ``GET /v1/adapters``, ``GET /v1/models``) are timed after the first 100 and after all uploads. Then four
  closed-loop phases of ``--duration`` s: 1 adapter, N adapters Zipf(1.0), N adapters uniform, 1 adapter again
  (the two 1-adapter phases bracket the machine's drift; the reference is their summed tokens / seconds).
- ``churn``: :data:`CHURN_FACTOR` x the engine's CPU cache (``--max-cpu-loras`` as sized from memory) adapters,
  uniform popularity, against a phase on as many adapters as the engine has device slots (all resident).

Both sample the engine's RSS (its whole process tree) every second and compare the peak with a budget: the RSS
at start (weights, KV cache and the device slots, which are zero-filled at start) plus the CPU cache's
allowance, ``max_cpu_loras`` x the bytes the memory plan reserves per cached adapter (rank 32, all seven
projections: far more than these adapters need). The engine's ``flylora_adapter_*`` counters give each phase's
cache misses. Write ``many_benchmark.json`` / ``churn_benchmark.json`` and a summary line into ``--out``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import httpx

from flylora_runtime.paths import data_dir

from loadtests.report import machine, percentile, write_json
from loadtests.stack import AdapterKind, Stack, _log

TINY = AdapterKind("fly-r4k1-qv-bf16", r=4, top_k=1, targets=("q_proj", "v_proj"))
N_MANY = 10_000
CHURN_FACTOR = 4
UPLOAD_PARALLEL = 8
UPLOAD_CHUNK = 500
LOOKUPS = 200
#: Gateway settings for one tenant holding thousands of adapters (everything else at its default).
GATEWAY = {"max_adapters_per_tenant": 0, "max_stored_bytes_per_tenant": 0, "max_uploads_per_tenant": UPLOAD_PARALLEL,
           "max_concurrent_uploads": UPLOAD_PARALLEL}
_COUNTER = re.compile(r'^(flylora_adapter_(?:loads|activations|requests)_total)(?:\{([^}]*)\})?\s+([0-9.eE+-]+)\s*$')


# --- adapters ----------------------------------------------------------------------------------------------

def adapter_tensors(shapes: dict[str, tuple[int, int]], r: int, top_k: int, seed: int, b_std: float = 0.02,
                    d_std: float = 0.01) -> dict:
    """The tensors of one random FlyLoRA adapter, bf16: per module (``{module: (in, out)}``) a sparse A
    (``in // (r // top_k)`` nonzeros per row, as the authors' init), a dense B and a routing bias d."""
    import torch

    from flylora_runtime.format.checkpoint import lora_keys

    gen = torch.Generator().manual_seed(seed)
    groups: dict[tuple[int, int], list[str]] = {}
    for module, shape in shapes.items():  # one batch of random draws per distinct shape: fast for thousands
        groups.setdefault(tuple(shape), []).append(module)
    out = {}
    for (n_in, n_out), modules in groups.items():
        g, p = len(modules), n_in // (r // top_k)
        cols = torch.rand(g, r, n_in, generator=gen).argsort(dim=2)[..., :p]
        a = torch.zeros(g, r, n_in).scatter_(2, cols, torch.randn(g, r, p, generator=gen) / r).bfloat16()
        b = (torch.randn(g, n_out, r, generator=gen) * b_std).bfloat16()
        d = (torch.randn(g, r, generator=gen) * d_std).bfloat16()
        for i, module in enumerate(modules):
            key_a, key_b, key_d = lora_keys(module)
            out[key_a], out[key_b], out[key_d] = a[i].clone(), b[i].clone(), d[i].clone()
    return out


def ensure_tiny_adapters(count: int, kind: AdapterKind = TINY, cache: Path | None = None) -> list[Path]:
    """Folders of ``count`` adapters of ``kind`` (seeds 0..count-1, bf16), generated once and cached.

    Faster than :func:`loadtests.stack.ensure_adapters` for thousands: the config is rendered once, and the
    weights are written without an fsync (a cache: a folder counts once its weights file was renamed in)."""
    root = (cache or data_dir() / "loadtests" / "adapters") / kind.name
    folders = [root / f"{i:05d}" for i in range(count)]
    missing = [f for f in folders if not (f / "adapter_model.safetensors").is_file()]
    if not missing:
        return folders
    import torch
    from safetensors.torch import save

    from flylora_runtime.format.checkpoint import expected_modules
    from flylora_runtime.format.modelspec import BaseModelSpec
    from flylora_runtime.paths import demo_model_dir
    from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter

    torch.set_num_threads(1)
    base = BaseModelSpec.from_pretrained(demo_model_dir())
    template = generate_adapter(base, GenerateSpec(r=kind.r, top_k=kind.top_k, targets=kind.targets))
    config_text = json.dumps(template.config.to_dict(), indent=2) + "\n"
    shapes = {m: base.shape_of(m) for m in expected_modules(template.config, base)}
    _log(f"generating {len(missing)} {kind.name} adapters into {root}")
    t0 = time.monotonic()
    for f in missing:
        f.mkdir(parents=True, exist_ok=True)
        (f / "adapter_config.json").write_text(config_text)
        tmp = f / ".adapter_model.tmp"
        tmp.write_bytes(save(adapter_tensors(shapes, kind.r, kind.top_k, 20_000 + int(f.name), d_std=kind.d_std),
                             metadata={"format": "pt"}))
        tmp.replace(f / "adapter_model.safetensors")
    _log(f"generated {len(missing)} in {time.monotonic() - t0:.1f} s")
    return folders


# --- engine counters, RSS and lookups ------------------------------------------------------------------------

def parse_counters(text: str) -> dict[str, float]:
    """The engine's ``flylora_adapter_{loads,activations,requests}_total`` from Prometheus text: keys
    ``loads``, ``activations``, ``hit``, ``miss`` (request counts by cache state); absent ones are 0."""
    out = {"loads": 0.0, "activations": 0.0, "hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        m = _COUNTER.match(line.strip())
        if not m:
            continue
        name, labels, value = m.groups()
        if name.endswith("requests_total"):
            cache = re.search(r'cache="([^"]*)"', labels or "")
            if cache and cache.group(1) in ("hit", "miss"):
                out[cache.group(1)] += float(value)
        else:
            out[name.removeprefix("flylora_adapter_").removesuffix("_total")] += float(value)
    return out


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict:
    """What happened between two scrapes: counts, and the share of requests that missed the CPU cache."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("loads", "activations", "hit", "miss")}
    requests = d["hit"] + d["miss"]
    return {**d, "requests": requests, "miss_rate": d["miss"] / requests if requests else None}


def rss_budget(plan, started_rss: int) -> dict:
    """The engine's memory budget from its plan: RSS at start plus the CPU cache's allowance."""
    allowance = plan.max_cpu_loras * plan.cache_adapter_bytes
    return {"started_rss_gib": started_rss / 2**30, "cache_allowance_gib": allowance / 2**30,
            "budget_gib": (started_rss + allowance) / 2**30, "max_cpu_loras": plan.max_cpu_loras,
            "max_loras": plan.max_loras, "cache_adapter_mib": plan.cache_adapter_bytes / 2**20,
            "cache_budget_gib": plan.cache_budget / 2**30, "slot_mib": plan.slot_bytes / 2**20,
            "memory_plan": plan.describe()}


class RssSampler:
    """The engine tree's RSS every ``interval`` seconds while running; ``peak(since)`` per phase."""

    def __init__(self, stack: Stack, interval: float = 1.0):
        self.stack, self.interval, self.samples = stack, interval, []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), await asyncio.to_thread(self.stack.rss_bytes)))
            await asyncio.sleep(self.interval)

    def __enter__(self):
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc) -> None:
        self._task.cancel()

    def peak(self, since: float = 0.0) -> int:
        return max((v for t, v in self.samples if t >= since), default=0)


async def scrape(stack: Stack) -> dict[str, float]:
    url = f"http://127.0.0.1:{stack.engine_config.port}/metrics"
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        r = await client.get(url)
        r.raise_for_status()
        return parse_counters(r.text)


def _dist(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": (percentile(xs, 50) or 0) * 1e3, "p99_ms": (percentile(xs, 99) or 0) * 1e3,
            "max_ms": max(xs, default=0) * 1e3}


def time_lookups(stack: Stack, names: list[str], n: int = LOOKUPS, lists: int = 3) -> dict:
    """Latency of the gateway's adapter lookups with ``len(names)`` adapters registered (one keep-alive client,
    one request at a time, on an idle engine)."""
    rng = random.Random(len(names))
    auth = {"Authorization": f"Bearer {stack.tenant_key}"}
    out = {"adapters": len(names)}
    with httpx.Client(base_url=stack.gateway_url, headers=auth, timeout=60, trust_env=False) as client:
        for label, paths in (("get_adapter", [f"/v1/adapters/{rng.choice(names)}" for _ in range(n)]),
                             ("list_adapters", ["/v1/adapters"] * lists), ("list_models", ["/v1/models"] * lists)):
            times, size = [], 0
            for path in paths:
                t0 = time.perf_counter()
                r = client.get(path)
                times.append(time.perf_counter() - t0)
                r.raise_for_status()
                size = len(r.content)
            out[label] = {**_dist(times), "response_bytes": size}
    return out


async def upload_chunks(stack: Stack, names: list[str], folders: list[Path], on_chunk=None) -> dict:
    """Upload in chunks of :data:`UPLOAD_CHUNK`; the rate of each (adapters/s) shows whether uploads slow as
    the registry grows. ``on_chunk(uploaded_names)`` runs after each chunk (e.g. timed lookups)."""
    from flylora_runtime.client import GatewayClient

    rates, t_all = [], time.monotonic()
    with GatewayClient(stack.gateway_url, stack.tenant_key, trust_env=False, timeout=120) as client:
        for i in range(0, len(names), UPLOAD_CHUNK):
            t0 = time.monotonic()
            pairs = list(zip(names[i:i + UPLOAD_CHUNK], folders[i:i + UPLOAD_CHUNK], strict=True))
            await asyncio.to_thread(client.upload_adapters, pairs, parallel=UPLOAD_PARALLEL)
            rates.append(len(pairs) / (time.monotonic() - t0))
            _log(f"uploaded {i + len(pairs)}/{len(names)} ({rates[-1]:.1f}/s this chunk)")
            if on_chunk:
                on_chunk(names[:i + len(pairs)])
    seconds = time.monotonic() - t_all
    return {"adapters": len(names), "seconds": seconds, "per_s": len(names) / seconds if seconds else None,
            "parallel": UPLOAD_PARALLEL, "chunk": UPLOAD_CHUNK, "per_chunk_per_s": rates}


# --- the two scenarios -------------------------------------------------------------------------------------

def _rate(runs: list[dict]) -> tuple[float, float]:
    seconds = sum(r["duration_s"] for r in runs)
    return sum(r["output_tokens"] for r in runs) / seconds if seconds else 0.0, seconds


async def _phase(b, stack: Stack, rss: RssSampler, key: str, spec, warm: list[str] | None) -> dict:
    """One measured phase; the engine's counters cover its measured requests only (scraped after warm-up)."""
    from dataclasses import replace

    from loadtests.generator import run_load
    from loadtests.workload import Lengths

    t0, warmup = time.monotonic(), None
    if warm:  # one short request per adapter, not measured: as b.measure's warm-up
        warmup = await run_load(replace(spec, models=warm, popularity="uniform", mode="closed",
                                        concurrency=min(len(warm), spec.concurrency), max_requests=len(warm),
                                        duration_s=600, output_tokens=Lengths(2, 2), progress=False,
                                        label="warm-up"))
    before = await scrape(stack)
    summary = await b.measure(stack, key, spec, warm=None)
    if warmup is not None:
        summary["warmup"] = {"issued": len(warmup.records), "ok": len(warmup.ok), "failed": len(warmup.failed)}
    summary["engine_counters"] = counter_delta(before, await scrape(stack))
    summary["engine_rss_peak_gib"] = rss.peak(t0) / 2**30
    return summary


def _row(s: dict) -> dict:
    return {"output_tokens_per_s": s["output_tokens_per_s"], "ttft_p50_s": s["ttft_s"]["p50"],
            "ttft_p99_s": s["ttft_s"]["p99"], "tpot_p50_s": s["tpot_s"]["p50"], "tpot_p99_s": s["tpot_s"]["p99"],
            "ok": s["ok"], "issued": s["issued"], "failed": s["failed"], "distinct_models": s["distinct_models"],
            "loadavg_1min": s["loadavg_before"][0], "engine_rss_peak_gib": s["engine_rss_peak_gib"],
            "cache": s["engine_counters"]}


def _start(name: str) -> Stack:
    return Stack(data_dir() / "loadtests" / f"stack-{name}", max_loras=0, max_cpu_loras=0, max_num_seqs=0,
                 dtype="bfloat16", gateway_settings=GATEWAY)


def _finish(b, stack_dir: Path, name: str, out: dict, text: str) -> None:
    shutil.rmtree(stack_dir / "store", ignore_errors=True)  # thousands of stored copies: logs are kept
    b.out.mkdir(parents=True, exist_ok=True)
    write_json(b.out / f"{name}_benchmark.json", out)
    (b.out / f"{name}_summary.txt").write_text(text + "\n")
    print(text, flush=True)


def _pct(x: float | None, scale: float = 1.0, spec: str = ".2f") -> str:
    return "-" if x is None else format(x * scale, spec)


async def run_many(b, base_model: str) -> dict:
    """Measure ``many``; ``b`` is a :class:`loadtests.run.Bench` (``b.meta['adapters']``: N)."""
    from flylora_runtime.engine.launcher import sized

    n = int(b.meta.get("adapters") or N_MANY)
    t_gen = time.monotonic()
    folders = await asyncio.to_thread(ensure_tiny_adapters, n)
    gen_s = time.monotonic() - t_gen
    names = [f"m-{i:05d}" for i in range(n)]
    t0 = time.monotonic()
    stack = _start("many")
    lookups = {}
    with stack:
        plan = sized(stack.engine_config)[1]
        budget = rss_budget(plan, stack.rss_bytes())
        described = {**stack.describe(), "max_loras": plan.max_loras, "max_cpu_loras": plan.max_cpu_loras,
                     "gateway_settings": GATEWAY}  # the counts as sized at start (the config keeps 0: "size")
        b.stacks["many"] = described
        with RssSampler(stack) as rss:
            upload = await upload_chunks(stack, names, folders, on_chunk=lambda done: lookups.setdefault(
                str(len(done)), time_lookups(stack, done)) if len(done) in (UPLOAD_CHUNK, n) else None)
            upload["engine_rss_peak_gib"] = rss.peak() / 2**30
            slots = plan.max_loras
            phases = {}
            phases["one_a"] = await _phase(b, stack, rss, "many_one_a", b.spec(stack, names[:1], "1 adapter",
                                           popularity="single"), warm=names[:1])
            phases["zipf"] = await _phase(b, stack, rss, "many_zipf", b.spec(
                stack, names, f"{n} zipf", popularity="zipf", zipf_alpha=1.0, seed=n), warm=names[:slots])
            phases["uniform"] = await _phase(b, stack, rss, "many_uniform", b.spec(
                stack, names, f"{n} uniform", popularity="uniform", seed=n + 1), warm=None)
            phases["one_b"] = await _phase(b, stack, rss, "many_one_b", b.spec(stack, names[:1], "1 adapter again",
                                           popularity="single"), warm=None)
            peak = rss.peak()
            samples = [(round(t - t0, 1), v) for t, v in rss.samples]
    one, one_s = _rate([phases["one_a"], phases["one_b"]])
    table = {k: _row(v) for k, v in phases.items()}
    one_ttft = percentile([phases["one_a"]["ttft_s"]["p50"], phases["one_b"]["ttft_s"]["p50"]], 50)
    for k in ("zipf", "uniform"):
        table[k]["over_1_adapter"] = phases[k]["output_tokens_per_s"] / one if one else None
        table[k]["ttft_p50_over_1_adapter"] = (phases[k]["ttft_s"]["p50"] / one_ttft
                                               if one_ttft and phases[k]["ttft_s"]["p50"] else None)
    budget.update({"peak_rss_gib": peak / 2**30, "within_budget": peak / 2**30 <= budget["budget_gib"],
                   "rss_samples_s_bytes": samples[::5]})
    z = table["zipf"]
    targets = {"zipf_throughput_ge_0.8x": (z["over_1_adapter"] or 0) >= 0.8,
               "zipf_ttft_p50_le_1.5x": (z["ttft_p50_over_1_adapter"] or float("inf")) <= 1.5,
               "rss_within_budget": budget["within_budget"]}
    out = {"machine": machine(), "command": b.meta.get("command"), "stack": described, "adapter": {
        "kind": TINY.name, "r": TINY.r, "top_k": TINY.top_k, "targets": list(TINY.targets), "dtype": "bfloat16",
        "file_bytes": (folders[0] / "adapter_model.safetensors").stat().st_size, "generate_s": gen_s},
        "settings": {"duration_s": b.duration_s, "concurrency": b.concurrency, "output_tokens": b.output_tokens,
                     "ignore_eos": True, "prompt_words": [32, 96]},
        "one_adapter_tokens_per_s": one, "one_adapter_seconds": one_s, "one_adapter_ttft_p50_s": one_ttft,
        "table": table, "targets": targets, "upload": upload, "lookups": lookups, "rss": budget,
        "session_s": time.monotonic() - t0, "runs": {k: v for k, v in b.results.items() if k.startswith("many_")}}
    lk = lookups.get(str(n), {})
    text = (f"many ({n} {TINY.name} adapters, {described['max_loras']} slots, {described['max_cpu_loras']} cached): "
            f"1 adapter {one:.1f} tok/s TTFT p50 {_pct(one_ttft)} s; zipf {z['output_tokens_per_s']:.1f} tok/s = "
            f"{_pct(z['over_1_adapter'])}x, TTFT p50 {_pct(z['ttft_p50_s'])} s = {_pct(z['ttft_p50_over_1_adapter'])}x, "
            f"miss rate {_pct(z['cache']['miss_rate'])}; uniform {table['uniform']['output_tokens_per_s']:.1f} tok/s = "
            f"{_pct(table['uniform']['over_1_adapter'])}x; upload {upload['per_s']:.1f}/s; GET adapter p50 "
            f"{lk.get('get_adapter', {}).get('p50_ms', float('nan')):.1f} ms at {n}; RSS peak {peak / 2**30:.2f} GiB "
            f"of {budget['budget_gib']:.2f} GiB budget; targets {targets}; load avg now {os.getloadavg()[0]:.1f}")
    _finish(b, stack.workdir, "many", out, text)
    return out


async def run_churn(b, base_model: str) -> dict:
    """Measure ``churn``: more adapters than the CPU cache, uniform; ``b.meta['adapters']`` overrides the count."""
    from flylora_runtime.engine.launcher import sized

    t0 = time.monotonic()
    stack = _start("churn")
    with stack:
        plan = sized(stack.engine_config)[1]
        budget = rss_budget(plan, stack.rss_bytes())
        described = {**stack.describe(), "max_loras": plan.max_loras, "max_cpu_loras": plan.max_cpu_loras,
                     "gateway_settings": GATEWAY}  # the counts as sized at start (the config keeps 0: "size")
        b.stacks["churn"] = described
        slots, cached = described["max_loras"], described["max_cpu_loras"]
        n = int(b.meta.get("adapters") or CHURN_FACTOR * cached)
        folders = await asyncio.to_thread(ensure_tiny_adapters, max(n, slots))
        names = [f"c-{i:05d}" for i in range(max(n, slots))]
        with RssSampler(stack) as rss:
            upload = await upload_chunks(stack, names, folders)
            phases = {"resident": await _phase(b, stack, rss, "churn_resident", b.spec(
                stack, names[:slots], f"{slots} resident", popularity="uniform", seed=1), warm=names[:slots]),
                      "churn": await _phase(b, stack, rss, "churn_uniform", b.spec(
                stack, names[:n], f"{n} uniform", popularity="uniform", seed=2), warm=None)}
            peak = rss.peak()
    table = {k: _row(v) for k, v in phases.items()}
    res = phases["resident"]["output_tokens_per_s"]
    table["churn"]["over_resident"] = phases["churn"]["output_tokens_per_s"] / res if res else None
    budget.update({"peak_rss_gib": peak / 2**30, "within_budget": peak / 2**30 <= budget["budget_gib"]})
    out = {"machine": machine(), "command": b.meta.get("command"), "stack": described,
           "adapter": {"kind": TINY.name, "count": n, "cpu_cache": cached, "slots": slots},
           "settings": {"duration_s": b.duration_s, "concurrency": b.concurrency, "output_tokens": b.output_tokens,
                        "ignore_eos": True, "prompt_words": [32, 96]},
           "table": table, "upload": upload, "rss": budget, "session_s": time.monotonic() - t0,
           "runs": {k: v for k, v in b.results.items() if k.startswith("churn_")}}
    c, r = table["churn"], table["resident"]
    text = (f"churn ({n} adapters uniform over a {cached}-adapter CPU cache, {slots} slots): {c['output_tokens_per_s']:.1f} "
            f"tok/s = {_pct(c['over_resident'])}x of {slots} resident ({r['output_tokens_per_s']:.1f}); TTFT p50/p99 "
            f"{_pct(c['ttft_p50_s'])}/{_pct(c['ttft_p99_s'])} s (resident {_pct(r['ttft_p50_s'])}/"
            f"{_pct(r['ttft_p99_s'])}); TPOT p50/p99 {_pct(c['tpot_p50_s'], 1e3, '.0f')}/"
            f"{_pct(c['tpot_p99_s'], 1e3, '.0f')} ms (resident {_pct(r['tpot_p50_s'], 1e3, '.0f')}/"
            f"{_pct(r['tpot_p99_s'], 1e3, '.0f')}); CPU-cache miss rate {_pct(c['cache']['miss_rate'])} "
            f"({c['cache']['loads']:.0f} loads); RSS peak {peak / 2**30:.2f} GiB of {budget['budget_gib']:.2f} GiB; "
            f"load avg now {os.getloadavg()[0]:.1f}")
    _finish(b, stack.workdir, "churn", out, text)
    return out
