"""Acceptance run for the demo adapters: score them through the HTTP API with the ``openai`` client.

Trains (or reuses from the cache) the three demo adapters, merges them the authors' way, starts one engine
(vLLM + the FlyLoRA plugin, fp32) and the gateway (``python -m server.cli``) as child processes on free loopback
ports, creates a tenant, uploads the four adapters through the API, then scores every model on every task's
held-out set:

1. one model at a time (``--concurrency`` requests in flight);
2. the three task adapters' requests interleaved in random order, ``--mixed-concurrency`` (default 64) in flight.

Prints a Markdown table and writes the results as JSON (``--json``). Exit status 1 when an acceptance
criterion fails (own task >= 90%, base <= 10%, other tasks <= 20%, in both phases).

    python -m flylora_runtime.demo.evaluate [--json docs/demo_scores.json] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flylora_runtime.demo.tasks import TASKS, Example, get_task

BASE = "SmolLM2-135M-Instruct"
MERGED = "merged"
MAX_TOKENS = 48
OWN_MIN, BASE_MAX, OTHER_MAX = 0.90, 0.10, 0.20


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def ask(client, model: str, ex: Example) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": ex.prompt}],
                                       max_tokens=MAX_TOKENS, temperature=0)
    return r.choices[0].message.content or ""


def score_jobs(client, jobs: list[tuple[str, str, Example]], concurrency: int) -> dict[str, dict[str, float]]:
    """Run (model, task, example) jobs ``concurrency`` at a time; accuracy per model and task."""
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(lambda j: ask(client, j[0], j[2]), jobs))
    hits: dict[tuple[str, str], list[bool]] = {}
    for (model, task, ex), reply in zip(jobs, replies, strict=True):
        hits.setdefault((model, task), []).append(get_task(task).score(ex, reply))
    out: dict[str, dict[str, float]] = {}
    for (model, task), h in hits.items():
        out.setdefault(model, {})[task] = sum(h) / len(h)
    return out


def check(scores: dict[str, dict[str, float]], adapters: list[str]) -> list[str]:
    """The acceptance criteria that fail (empty: all hold)."""
    bad = []
    for task, acc in scores.get(BASE, {}).items():
        if acc > BASE_MAX:
            bad.append(f"base model scores {acc:.0%} on {task} (> {BASE_MAX:.0%})")
    for a in adapters:
        for task, acc in scores.get(a, {}).items():
            if task == a and acc < OWN_MIN:
                bad.append(f"{a} scores {acc:.0%} on its own task (< {OWN_MIN:.0%})")
            if task != a and acc > OTHER_MAX:
                bad.append(f"{a} scores {acc:.0%} on {task} (> {OTHER_MAX:.0%})")
    return bad


def table(scores: dict[str, dict[str, float]], models: list[str]) -> str:
    tasks = list(TASKS)
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for m in models:
        name = "base (no adapter)" if m == BASE else m
        lines.append(f"| {name} | " + " | ".join(f"{scores[m][t]:.0%}" for t in tasks) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flylora-evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="score only the first N held-out examples per task")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight in phase 1")
    p.add_argument("--mixed-concurrency", type=int, default=64, help="requests in flight in phase 2 (interleaved)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import openai

    from flylora_runtime.client import GatewayClient
    from flylora_runtime.demo.model import ensure_demo_model
    from flylora_runtime.demo.trained import ensure_all
    from flylora_runtime.engine.launcher import EngineConfig
    from flylora_runtime.engine.process import EngineProcess, GatewayProcess, free_port
    from flylora_runtime.format.modelspec import BaseModelSpec
    from flylora_runtime.training.merge import merge_adapters
    from flylora_runtime.weights.dense import FlyLoRAAdapter

    model_dir = ensure_demo_model()
    t0 = time.perf_counter()
    paths = ensure_all(model_dir)
    training = {t: json.loads((p / "training.json").read_text()) for t, p in paths.items()}
    spec = BaseModelSpec.from_pretrained(model_dir)
    tmp = Path(tempfile.mkdtemp(prefix="flylora-eval-"))
    merge_adapters([FlyLoRAAdapter.load(paths[t], spec) for t in TASKS]).save(tmp / MERGED)
    paths_all = {**paths, MERGED: tmp / MERGED}
    _log(f"adapters ready in {time.perf_counter() - t0:.0f} s: {', '.join(paths_all)}")

    store = tmp / "store"
    store.mkdir()
    config = EngineConfig(model=str(model_dir), adapter_store=str(store), port=free_port(), dtype="float32",
                          max_loras=4, max_cpu_loras=8, max_lora_rank=32, max_num_seqs=64)
    admin = "eval-admin-" + os.urandom(16).hex()
    # Only these settings (none of this shell's FLYLORA_* variables): a private registry in the temp folder.
    gateway = GatewayProcess(tmp / "gateway.log", port=free_port(), inherit_settings=False, settings={
        "data_dir": tmp, "database_url": f"sqlite:///{tmp / 'registry.db'}", "adapter_store": store,
        "base_model_id": BASE, "base_model_dir": model_dir, "engine_urls": [f"http://127.0.0.1:{config.port}"],
        "admin_key": admin, "engine_read_timeout_s": 600, "max_concurrency_per_tenant": 256})
    _log("starting the engine (fp32; 20-60 s) and the gateway")
    with EngineProcess(config, tmp / "engine.log") as _engine, gateway:
        with GatewayClient(gateway.url, admin) as c:
            key = c.create_tenant("eval")
        with GatewayClient(gateway.url, key) as c:
            c.upload_adapters(paths_all.items())
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=600)
        heldout = {t: get_task(t).heldout()[:args.limit] for t in TASKS}
        models = [BASE, *TASKS, MERGED]

        t1 = time.perf_counter()
        isolated: dict[str, dict[str, float]] = {}
        for m in models:
            jobs = [(m, t, ex) for t in TASKS for ex in heldout[t]]
            isolated.update(score_jobs(client, jobs, args.concurrency))
            _log(f"phase 1: {m}: " + ", ".join(f"{t} {isolated[m][t]:.0%}" for t in TASKS))
        t_iso = time.perf_counter() - t1

        t2 = time.perf_counter()
        jobs = [(a, t, ex) for a in TASKS for t in TASKS for ex in heldout[t]]
        random.Random(0).shuffle(jobs)
        mixed = score_jobs(client, jobs, args.mixed_concurrency)
        t_mix = time.perf_counter() - t2
        _log(f"phase 2: {len(jobs)} requests of 3 adapters interleaved, {args.mixed_concurrency} in flight, "
             f"{t_mix:.0f} s")
    shutil.rmtree(tmp, ignore_errors=True)  # kept when something failed above: the logs are in it

    failures = check(isolated, list(TASKS)) + [f"(interleaved) {f}" for f in check(mixed, list(TASKS))]
    print("\nOne model at a time (held-out sets, through the gateway):\n")
    print(table(isolated, models))
    print(f"\nThe three adapters interleaved, {args.mixed_concurrency} requests in flight:\n")
    print(table(mixed, list(TASKS)))
    print("\nTraining (per adapter): " + "; ".join(
        f"{t} {v['seconds']:.0f} s (load avg {v['loadavg_1_5_15'][0]:.1f})" for t, v in training.items()))
    print("\nacceptance: " + ("PASS" if not failures else "FAIL\n  " + "\n  ".join(failures)))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "held_out_sizes": {t: len(v) for t, v in heldout.items()}, "isolated": isolated, "interleaved": mixed,
            "interleaved_in_flight": args.mixed_concurrency, "seconds": {"isolated": round(t_iso), "interleaved":
                                                                         round(t_mix)},
            "training": training, "failures": failures}, indent=2) + "\n")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
