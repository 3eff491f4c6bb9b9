"""Fairness under overload: does a quiet tenant's time to first token survive a noisy neighbour?

    python -m loadtests.run fairness [--duration 60]

One engine (the fp32 demo model, ``--max-num-seqs`` = ``BATCH``) behind one gateway with fair admission
sized to that batch (``FLYLORA_ADMISSION_IN_FLIGHT_PER_ENGINE=BATCH``, a tenant holds at most 3/4 of it). A
quiet tenant sends one streamed request at a time (``QUIET_TOKENS`` tokens, a short pause between them) and
its time to first token (TTFT, measured by its own client) is recorded in four runs of ``--duration`` seconds,
while other tenants keep non-streamed requests of ``LOAD_TOKENS`` tokens in flight:

* ``alone``: nobody else;
* ``fair``: six more tenants, one request each: the engine runs as many requests as in ``noisy``, every
  tenant within its share;
* ``noisy``: one more tenant with ten times what the engine can take in flight (``10 x BATCH`` requests);
* ``noisy_no_admission``: the same, through a second gateway with fair admission off (every request goes
  straight to vLLM's first-come-first-served queue): what the gateway's admission buys.

The promise (docs/RELIABILITY.md): the quiet tenant's p99 TTFT with the noisy tenant is within 2x of ``fair``.
The engine's running and waiting requests and the gateway's admission gauges are sampled every half second. Results go to
``docs/bench/fairness.json`` and ``fairness.png``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from flylora_runtime.engine.process import GatewayProcess, free_port
from loadtests.clients import Outcome, async_client, request
from loadtests.report import machine, percentile, write_json

BATCH = 8
QUIET_TOKENS = 4
LOAD_TOKENS = 32
QUIET_PAUSE_S = 0.1


def _log(msg: str) -> None:
    print(f"[fairness] {msg}", file=sys.stderr, flush=True)


@dataclass
class Load:
    tenant: str
    key: str
    concurrency: int


GAUGES = {"vllm:num_requests_running": "engine_running", "vllm:num_requests_waiting": "engine_waiting",
          "flylora_gateway_admission_in_flight": "gateway_in_flight",
          "flylora_gateway_admission_waiting": "gateway_waiting"}


async def sampler(urls: list[str], stop: asyncio.Event, samples: list[dict[str, float]]) -> None:
    """The engine's running and waiting requests and the gateway's admission gauges, every half second."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        while not stop.is_set():
            sample: dict[str, float] = {}
            for url in urls:
                try:
                    text = (await client.get(url + "/metrics")).text
                except httpx.HTTPError:
                    continue
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        if s.name in GAUGES:
                            sample[GAUGES[s.name]] = sample.get(GAUGES[s.name], 0.0) + s.value
            samples.append(sample)
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _dist(values: list[float]) -> dict:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values) if values else None}


async def scenario(url: str, engine_url: str, quiet_key: str, loads: list[Load], model: str, duration_s: float,
                   *, quiet_tokens: int = QUIET_TOKENS, load_tokens: int = LOAD_TOKENS) -> dict:
    """Run the quiet tenant against ``loads`` for ``duration_s``; the quiet tenant's TTFT and everyone's outcomes."""
    quiet: list[Outcome] = []
    loaded: list[Outcome] = []
    samples: list[dict[str, float]] = []
    stop = asyncio.Event()
    connections = 8 + sum(ld.concurrency for ld in loads)
    # The quiet tenant has a client (connection pool) of its own, as a separate customer would.
    async with async_client(url, connections=connections) as client, async_client(url, connections=4) as own:

        async def quiet_loop() -> None:
            while not stop.is_set():
                quiet.append(await request(own, "quiet", quiet_key, model, stream=True, max_tokens=quiet_tokens))
                await asyncio.sleep(QUIET_PAUSE_S)

        async def load_loop(ld: Load) -> None:
            while not stop.is_set():
                o = await request(client, ld.tenant, ld.key, model, stream=False, max_tokens=load_tokens)
                loaded.append(o)
                if o.status == 429:
                    await asyncio.sleep(float(o.retry_after or 1))

        tasks = [asyncio.create_task(load_loop(ld)) for ld in loads for _ in range(ld.concurrency)]
        await asyncio.sleep(3 if loads else 0)  # the load settles before the quiet tenant starts
        sampling = asyncio.create_task(sampler([url, engine_url], stop, samples))
        t0 = time.monotonic()
        qtask = asyncio.create_task(quiet_loop())
        await asyncio.sleep(duration_s)
        stop.set()
        await qtask
        await sampling
        for t in tasks:  # hang up on the load: streams are aborted, queued requests leave the queue
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - t0
    ttft = [o.ttft for o in quiet if o.ok and o.ttft is not None]
    statuses: dict[str, int] = {}
    for o in loaded:
        k = str(o.status) if o.transport_error is None else "transport_error"
        statuses[k] = statuses.get(k, 0) + 1
    return {
        "quiet_ttft_s": _dist(ttft), "quiet_requests": len(quiet), "quiet_failed": sum(not o.ok for o in quiet),
        "quiet_errors": [o.error or o.transport_error for o in quiet if not o.ok][:5],
        "load_tenants": [{"tenant": ld.tenant, "concurrency": ld.concurrency} for ld in loads],
        "load_requests_done": sum(o.ok for o in loaded), "load_statuses": statuses,
        "load_output_tokens_per_s": sum(o.ok for o in loaded) * load_tokens / elapsed,
        **{f"{key}_mean": _mean([s.get(key) for s in samples]) for key in GAUGES.values()},
        "samples": len(samples), "seconds": elapsed,
    }


async def three_runs(url: str, engine_url: str, keys: dict[str, str], model: str, duration_s: float,
                     batch: int = BATCH) -> dict[str, dict]:
    """``alone``, ``fair`` and ``noisy`` (keys: ``quiet``, ``fair-0..5``, ``noisy``)."""
    fair = [Load(f"fair-{i}", keys[f"fair-{i}"], 1) for i in range(6)]
    noisy = [Load("noisy", keys["noisy"], 10 * batch)]
    out = {}
    for name, loads in (("alone", []), ("fair", fair), ("noisy", noisy)):
        out[name] = await scenario(url, engine_url, keys["quiet"], loads, model, duration_s)
        q = out[name]["quiet_ttft_s"]
        _log(f"{name}: quiet TTFT p50 {q['p50']:.3f} s p99 {q['p99']:.3f} s over {q['n']}; engine running "
             f"{out[name]['engine_running_mean']}, waiting {out[name]['engine_waiting_mean']}; gateway in flight "
             f"{out[name]['gateway_in_flight_mean']}, waiting {out[name]['gateway_waiting_mean']}; "
             f"load {out[name]['load_statuses']}")
        await asyncio.sleep(2)
    return out


def tenant_keys(url: str, admin_key: str, names: list[str]) -> dict[str, str]:
    keys = {}
    with httpx.Client(base_url=url, timeout=30, trust_env=False,
                      headers={"authorization": f"Bearer {admin_key}"}) as admin:
        for name in names:
            r = admin.post("/admin/tenants", json={"name": name, "max_concurrency": 100_000})
            r.raise_for_status()
            keys[name] = r.json()["api_key"]
    return keys


def start_extra_gateway(stack, port: int, log: Path, settings: dict[str, object]) -> GatewayProcess:
    """A second gateway process on the same registry and engine as ``stack``'s (``settings`` changed)."""
    return GatewayProcess(log, port=port, ready_timeout=60, grace=15,
                          settings={**stack.gateway_settings, **settings}).start()


def plot(path: Path, results: dict[str, dict]) -> None:
    from loadtests.report import _plt

    plt = _plt()
    names = list(results)
    p50 = [results[n]["quiet_ttft_s"]["p50"] or 0 for n in names]
    p99 = [results[n]["quiet_ttft_s"]["p99"] or 0 for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50", color="#4c72b0")
    ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99", color="#dd8452")
    for x, v in zip(xs, p99, strict=True):
        ax.annotate(f"{v:.2f}", (x + 0.2, v), ha="center", va="bottom", fontsize=8)
    if "fair" in results:
        ax.axhline(2 * (results["fair"]["quiet_ttft_s"]["p99"] or 0), color="#c44e52", linestyle="--",
                   label="2 x p99 under fair load (the bound)")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("quiet tenant's time to first token (s)")
    ax.set_yscale("log")
    ax.set_title(f"Quiet tenant's time to first token (engine batch {BATCH}; the noisy tenant keeps 10x that "
                 "in flight)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def benchmark(out: Path, duration_s: float) -> dict:
    from flylora_runtime.paths import data_dir

    from loadtests.stack import Stack

    workdir = data_dir() / "loadtests" / "stack-fairness"
    settings = {"admission_in_flight_per_engine": BATCH, "admission_queue_depth": 1000,
                "admission_queue_timeout_s": 300}
    results: dict[str, dict] = {}
    t0 = time.monotonic()
    with Stack(workdir, max_loras=2, max_cpu_loras=4, max_num_seqs=BATCH, dtype="float32",
               gateway_settings=settings) as stack:
        engine_url = f"http://127.0.0.1:{stack.engine_config.port}"
        keys = tenant_keys(stack.gateway_url, stack.admin_key, ["quiet", "noisy", *[f"fair-{i}" for i in range(6)]])
        model = "SmolLM2-135M-Instruct"
        results.update(await three_runs(stack.gateway_url, engine_url, keys, model, duration_s))
        port = free_port()
        extra = start_extra_gateway(stack, port, workdir / "gateway-no-admission.log",
                                    {"admission_in_flight_per_engine": 0})
        try:
            results["noisy_no_admission"] = await scenario(
                f"http://127.0.0.1:{port}", engine_url, keys["quiet"], [Load("noisy", keys["noisy"], 10 * BATCH)],
                model, duration_s)
            q = results["noisy_no_admission"]["quiet_ttft_s"]
            _log(f"noisy_no_admission: quiet TTFT p50 {q['p50']:.3f} s p99 {q['p99']:.3f} s over {q['n']}")
        finally:
            extra.stop()
        stack_info = stack.describe()
    fair_p99 = results["fair"]["quiet_ttft_s"]["p99"]
    noisy_p99 = results["noisy"]["quiet_ttft_s"]["p99"]
    summary = {"noisy_over_fair_p99": noisy_p99 / fair_p99 if fair_p99 and noisy_p99 else None,
               "bound": 2.0, "within_bound": bool(fair_p99 and noisy_p99 and noisy_p99 <= 2 * fair_p99)}
    data = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": "python -m loadtests.run fairness "
            f"--duration {duration_s:g}", "batch": BATCH, "quiet_tokens": QUIET_TOKENS, "load_tokens": LOAD_TOKENS,
            "duration_s": duration_s, "stack": stack_info, "gateway_settings": settings, "summary": summary,
            "runs": results, "wall_s": time.monotonic() - t0, "loadavg_end": list(os.getloadavg())}
    write_json(out / "fairness.json", data)
    plot(out / "fairness.png", results)
    _log(f"noisy/fair p99 = {summary['noisy_over_fair_p99']}; wrote {out / 'fairness.json'}")
    return data
