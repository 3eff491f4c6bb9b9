"""Soak: a long mixed load, with the gateway's and the engine's memory and open files sampled throughout.

    python -m loadtests.run soak [--duration 600]

One engine (bf16 demo model, 4 slots, 8 CPU-cached adapters, 16 sequences) and one gateway process (fair
admission on, 16 slots) on free loopback ports, four tenants with four adapters each, and at once:

* completions: non-streamed requests on a random tenant's adapter or the base model;
* streams: streamed requests, read to ``[DONE]``;
* cancellations: streams the client hangs up on after a few events;
* churn: per round, a tenant uploads a new adapter, uses it, deletes it; a racer sends requests on the
  name being churned (404 once it is gone: expected);

Every ``--sample-s`` seconds the resident memory (RSS) and open file descriptors of the gateway process and
of the engine's process tree are read (psutil). Afterwards: the slope of each over the run after the first
fifth (least squares, per minute), and an account of every request: each one the clients issued has an
outcome (ok, hung up on purpose, 404 on a churned name, 429) and nothing else is allowed (no 5xx, no
broken connection, no request without an answer); the gateway's own ``flylora_gateway_requests_total``
must count the same number of completion requests, its upload and delete counters the same 201s and 204s.
Writes ``docs/bench/soak.json`` and ``docs/bench/soak.png``.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtests.clients import Outcome, async_client, request
from loadtests.report import machine, write_json

TENANTS = 4
ADAPTERS_PER_TENANT = 4
PROMPTS = ["Write one sentence about the sea.", "Name three colours.", "What is 12 plus 7?",
           "Give me a tip for learning to cook.", "Describe a cat in five words.", "Why is the sky blue?"]


def _log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


@dataclass
class Target:
    """What the soak runs against: a gateway URL, its admin key, and the processes to watch."""

    url: str
    admin_key: str
    gateway_pid: int
    engine_pid: int
    adapter_folders: list[Path]  # sources for uploads, reused round-robin


@dataclass
class Soak:
    outcomes: dict[str, list[Outcome]] = field(default_factory=lambda: {
        "completion": [], "stream": [], "cancel": [], "churn": [], "racer": []})
    uploads: dict[int, int] = field(default_factory=dict)  # status -> count
    deletes: dict[int, int] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    churned: list[str] = field(default_factory=list)


def tree_usage(pid: int) -> tuple[int, int]:
    """(RSS bytes, open file descriptors) of a process and its children."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = fds = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, fds


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return 60 * sum((x - mx) * (y - my) for x, y in points) / var


async def gateway_counts(url: str) -> dict[str, float]:
    """The gateway's own counts: completion requests by status, uploads, deletes."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {"requests": 0.0, "uploads": 0.0, "deletes": 0.0}
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        text = (await client.get(url + "/metrics")).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "flylora_gateway_requests_total":
                out["requests"] += s.value
                out[f"status_{s.labels['status']}"] = out.get(f"status_{s.labels['status']}", 0) + s.value
            elif s.name == "flylora_gateway_adapter_uploads_total":
                out["uploads"] += s.value
            elif s.name == "flylora_gateway_adapter_deletes_total":
                out["deletes"] += s.value
    return out


async def run_soak(target: Target, duration_s: float, *, sample_s: float = 5.0, seed: int = 0,
                   workers: dict[str, int] | None = None) -> dict:
    """Drive the mixed load for ``duration_s``; returns the summary (samples, slopes, accounting)."""
    w = {"completion": 4, "stream": 4, "cancel": 2, "churn": 1, "racer": 1, **(workers or {})}
    rng = random.Random(seed)
    soak = Soak()
    before = await gateway_counts(target.url)
    async with async_client(target.url, connections=64, timeout=300) as client:
        admin = {"authorization": f"Bearer {target.admin_key}"}
        keys: dict[str, str] = {}
        adapters: dict[str, list[str]] = {}
        tag = f"{int(time.time()) % 100000}"
        for t in range(TENANTS):
            name = f"soak-{tag}-{t}"
            r = await client.post("/admin/tenants", json={"name": name, "max_concurrency": 1000}, headers=admin)
            r.raise_for_status()
            keys[name] = r.json()["api_key"]
            adapters[name] = []
            for a in range(ADAPTERS_PER_TENANT):
                status = await upload(client, keys[name], f"a{a}", target.adapter_folders[a % len(target.adapter_folders)])
                if status != 201:
                    raise RuntimeError(f"setting up the soak: upload answered {status}")
                adapters[name].append(f"a{a}")
        tenants = list(keys)
        base = "SmolLM2-135M-Instruct"
        stop = asyncio.Event()
        churn_name: dict[str, str | None] = {"tenant": None, "name": None}

        def pick() -> tuple[str, str]:
            tenant = rng.choice(tenants)
            return tenant, rng.choice([base, *adapters[tenant]])

        async def completion_loop() -> None:
            while not stop.is_set():
                tenant, model = pick()
                soak.outcomes["completion"].append(await request(
                    client, tenant, keys[tenant], model, stream=False, max_tokens=rng.randint(4, 24),
                    prompt=rng.choice(PROMPTS)))

        async def stream_loop() -> None:
            while not stop.is_set():
                tenant, model = pick()
                soak.outcomes["stream"].append(await request(
                    client, tenant, keys[tenant], model, stream=True, max_tokens=rng.randint(8, 48),
                    prompt=rng.choice(PROMPTS)))

        async def cancel_loop() -> None:
            while not stop.is_set():
                tenant, model = pick()
                soak.outcomes["cancel"].append(await request(
                    client, tenant, keys[tenant], model, stream=True, max_tokens=64, prompt=rng.choice(PROMPTS),
                    cancel_after=rng.randint(1, 4)))

        async def churn_loop() -> None:
            n = 0
            while not stop.is_set():
                tenant = rng.choice(tenants)
                name = f"churn-{n}"
                n += 1
                folder = target.adapter_folders[n % len(target.adapter_folders)]
                status = await upload(client, keys[tenant], name, folder)
                soak.uploads[status] = soak.uploads.get(status, 0) + 1
                if status == 201:
                    churn_name.update(tenant=tenant, name=name)
                    soak.churned.append(name)
                    for _ in range(rng.randint(1, 3)):
                        soak.outcomes["churn"].append(await request(
                            client, tenant, keys[tenant], name, stream=rng.random() < 0.5, max_tokens=8))
                    r = await client.delete(f"/v1/adapters/{name}", headers={"authorization": f"Bearer {keys[tenant]}"})
                    soak.deletes[r.status_code] = soak.deletes.get(r.status_code, 0) + 1
                await asyncio.sleep(rng.uniform(0.5, 2.0))

        async def racer_loop() -> None:
            while not stop.is_set():
                tenant, name = churn_name["tenant"], churn_name["name"]
                if name is None:
                    await asyncio.sleep(0.2)
                    continue
                soak.outcomes["racer"].append(await request(client, tenant, keys[tenant], name, stream=False,
                                                            max_tokens=4))
                await asyncio.sleep(0.1)

        async def sampler() -> None:
            t0 = time.monotonic()
            while True:
                g_rss, g_fds = tree_usage(target.gateway_pid)
                e_rss, e_fds = tree_usage(target.engine_pid)
                soak.samples.append({"t": time.monotonic() - t0, "gateway_rss_mib": g_rss / 2**20,
                                     "gateway_fds": g_fds, "engine_rss_mib": e_rss / 2**20, "engine_fds": e_fds,
                                     "requests": sum(len(v) for v in soak.outcomes.values()),
                                     "loadavg": os.getloadavg()[0]})
                if stop.is_set():
                    return
                try:
                    await asyncio.wait_for(stop.wait(), sample_s)
                except TimeoutError:
                    pass

        loops = {"completion": completion_loop, "stream": stream_loop, "cancel": cancel_loop, "churn": churn_loop,
                 "racer": racer_loop}
        tasks = [asyncio.create_task(loops[kind]()) for kind, count in w.items() for _ in range(count)]
        sampling = asyncio.create_task(sampler())
        t_start = time.monotonic()
        last = t_start
        while time.monotonic() - t_start < duration_s:
            await asyncio.sleep(1)
            if time.monotonic() - last >= 60:
                last = time.monotonic()
                s = soak.samples[-1]
                _log(f"{last - t_start:.0f} s: {s['requests']} requests; gateway {s['gateway_rss_mib']:.0f} MiB "
                     f"{s['gateway_fds']} fds; engine {s['engine_rss_mib']:.0f} MiB {s['engine_fds']} fds")
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 300)  # every request in flight ends: none is dropped
        await sampling
        elapsed = time.monotonic() - t_start
    await asyncio.sleep(1)  # the gateway's book-keeping of the last requests
    after = await gateway_counts(target.url)
    return summarize(soak, before, after, elapsed)


async def upload(client: httpx.AsyncClient, key: str, name: str, folder: Path) -> int:
    files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
    r = await client.post("/v1/adapters", data={"name": name}, files=files, headers={"authorization": f"Bearer {key}"})
    return r.status_code


def _category(kind: str, o: Outcome) -> str:
    if o.transport_error:
        return "transport_error"
    if o.cancelled:
        return "hung_up"
    if o.ok:
        return "ok"
    if o.status == 200:
        return f"stream_error_{(o.error or {}).get('code')}"
    return str(o.status)


def summarize(soak: Soak, before: dict[str, float], after: dict[str, float], elapsed: float) -> dict:
    accounts: dict[str, dict[str, int]] = {}
    for kind, outcomes in soak.outcomes.items():
        acc: dict[str, int] = {}
        for o in outcomes:
            c = _category(kind, o)
            acc[c] = acc.get(c, 0) + 1
        accounts[kind] = acc
    issued = sum(len(v) for v in soak.outcomes.values())
    allowed = {"ok", "hung_up", "429"}
    # 404 only where a name may have just been deleted: the racer's, and a churn request cut by its own delete.
    unexpected = {kind: {c: n for c, n in acc.items() if c not in allowed and not (
        kind in ("racer", "churn") and c in ("404", "stream_error_model_not_found"))}
        for kind, acc in accounts.items()}
    unexpected = {k: v for k, v in unexpected.items() if v}
    gateway_requests = after["requests"] - before["requests"]
    warm = [s for s in soak.samples if s["t"] >= elapsed / 5]
    slopes = {key: slope_per_min([(s["t"], s[key]) for s in warm])
              for key in ("gateway_rss_mib", "gateway_fds", "engine_rss_mib", "engine_fds")}
    first, last = (warm[0], warm[-1]) if warm else ({}, {})
    summary = {
        "duration_s": elapsed, "issued": issued, "accounts": accounts, "unexpected": unexpected,
        "requests_per_s": issued / elapsed if elapsed else 0.0,
        "gateway_counted_requests": gateway_requests,
        "gateway_counted_by_status": {k[7:]: after[k] - before.get(k, 0) for k in after if k.startswith("status_")},
        "uploads": soak.uploads, "deletes": soak.deletes,
        "gateway_counted_uploads": after["uploads"] - before["uploads"],
        "gateway_counted_deletes": after["deletes"] - before["deletes"],
        "slopes_per_min_after_first_fifth": slopes,
        "first_last_after_first_fifth": {k: [first.get(k), last.get(k)] for k in slopes},
        "samples": soak.samples,
    }
    setup_uploads = TENANTS * ADAPTERS_PER_TENANT
    summary["zero_lost"] = (not unexpected and gateway_requests == issued
                            and summary["gateway_counted_uploads"] == soak.uploads.get(201, 0) + setup_uploads
                            and summary["gateway_counted_deletes"] == soak.deletes.get(204, 0))
    return summary


def plot(path: Path, summary: dict, title: str) -> None:
    from loadtests.report import _plt

    plt = _plt()
    samples = summary["samples"]
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    panels = [("gateway_rss_mib", "gateway RSS (MiB)"), ("gateway_fds", "gateway open files"),
              ("engine_rss_mib", "engine RSS, all processes (MiB)"), ("engine_fds", "engine open files")]
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        ax.plot(t, [s[key] for s in samples], color="#4c72b0")
        slope = summary["slopes_per_min_after_first_fifth"][key]
        ax.set_title(f"{label}; slope {slope:+.2f}/min" if slope is not None else label, fontsize=9)
        ax.set_ylim(bottom=0, top=max(s[key] for s in samples) * 1.25 or 1)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("minutes")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def benchmark(out: Path, duration_s: float, sample_s: float = 5.0) -> dict:
    from flylora_runtime.paths import data_dir

    from loadtests.stack import AdapterKind, Stack, ensure_adapters

    workdir = data_dir() / "loadtests" / "stack-soak"
    settings = {"admission_in_flight_per_engine": 16, "admission_queue_depth": 64,
                "admission_queue_timeout_s": 120, "delete_grace_s": 5}
    folders = ensure_adapters(AdapterKind("fly-r8k2-qv", r=8, top_k=2, targets=("q_proj", "v_proj")), 8)
    t0 = time.monotonic()
    with Stack(workdir, max_loras=4, max_cpu_loras=8, max_num_seqs=16, gateway_settings=settings) as stack:
        target = Target(url=stack.gateway_url, admin_key=stack.admin_key, gateway_pid=stack.gateway.pid,
                        engine_pid=stack.engine.pid, adapter_folders=folders)
        summary = await run_soak(target, duration_s, sample_s=sample_s)
        summary["stack"] = stack.describe()
    summary.update({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "gateway_settings": settings,
                    "command": f"python -m loadtests.run soak --duration {duration_s:g}",
                    "wall_s": time.monotonic() - t0})
    write_json(out / "soak.json", summary)
    slopes = summary["slopes_per_min_after_first_fifth"]
    plot(out / "soak.png", summary, f"Soak, {duration_s / 60:.0f} min mixed load: {summary['issued']} requests, "
         f"zero lost: {summary['zero_lost']}")
    _log(f"{summary['issued']} requests in {summary['duration_s']:.0f} s; accounts {summary['accounts']}; "
         f"unexpected {summary['unexpected']}; gateway counted {summary['gateway_counted_requests']:.0f}; "
         f"slopes/min {slopes}; zero lost: {summary['zero_lost']}")
    return summary
