"""``python -m loadtests.run defaults``: what a user gets from the engine's default settings.

The stack is started as ``make serve`` starts it: no slot, cache or sequence flags, so the engine sizes its
device slots and CPU cache from memory (flylora_runtime/engine/sizing.py) and the log says how; the only
setting given is the dtype, bf16 (what ``auto`` resolves to for the demo model anyway). 16 FlyLoRA adapters
(r=32, k=8, all seven projections; ``--adapter-kind qv``: q_proj and v_proj only) are uploaded through the API; 16 closed-loop clients each pick one of
them uniformly, against the same clients on the base model. Base and adapter phases alternate
(base, adapters, base, adapters, ...) so that a change in the shared machine's load shows up in both, and
the ratio is taken over the summed tokens and seconds of each. Writes ``defaults_benchmark.json`` and
``defaults_summary.txt`` into ``--out``.
"""

from __future__ import annotations

import os
import time

from flylora_runtime.paths import data_dir

from loadtests.report import machine, write_json
from loadtests.stack import FLYLORA_FULL, FLYLORA_QV, Stack, ensure_adapters

ROUNDS = 2
N_ADAPTERS = 16
#: ``--adapter-kind``: the adapters' shape (r=32, k=8; all seven projections, or q_proj and v_proj only).
ADAPTER_KINDS = {"full": FLYLORA_FULL, "qv": FLYLORA_QV}


def _plan(config) -> list[str] | None:
    """The engine's memory plan for ``config`` (the arithmetic its log prints), or None if not sizable."""
    from flylora_runtime.engine.launcher import sized

    try:
        return sized(config)[1].describe()
    except (ValueError, AttributeError):
        return None


def _counts(config) -> tuple[int, int] | None:
    """(device slots, CPU-cached adapters) as the engine sized them for ``config``, or None if not sizable."""
    from flylora_runtime.engine.launcher import sized

    try:
        memory = sized(config)[1]
    except (ValueError, AttributeError):
        return None
    return (memory.max_loras, memory.max_cpu_loras) if memory is not None else None


def _rate(runs: list[dict]) -> float:
    seconds = sum(r["duration_s"] for r in runs)
    return sum(r["output_tokens"] for r in runs) / seconds if seconds else 0.0


async def run_defaults(b, base_model: str) -> dict:
    """Measure; ``b`` is a :class:`loadtests.run.Bench` (duration, clients, output tokens, out folder)."""
    workdir = data_dir() / "loadtests" / "stack-defaults"
    names = [f"fly-{i:04d}" for i in range(N_ADAPTERS)]
    t0 = time.monotonic()
    with Stack(workdir, max_loras=0, max_cpu_loras=0, max_num_seqs=0, dtype="bfloat16") as stack:
        described = {**stack.describe(), "started_rss_gib": stack.rss_bytes() / 2**30,
                     "memory_plan": _plan(stack.engine.config)}
        counts = _counts(stack.engine.config)
        if counts:  # the config keeps 0 ("size from memory"): report the counts the engine was started with
            described.update(max_loras=counts[0], max_cpu_loras=counts[1])
        b.stacks["defaults"] = described
        kind = ADAPTER_KINDS[b.meta.get("adapter_kind") or "full"]
        await stack.upload(names, ensure_adapters(kind, N_ADAPTERS))
        base_runs, fly_runs = [], []
        for i in range(ROUNDS):
            first = i == 0
            base_runs.append(await b.measure(stack, f"defaults_base_{i}",
                                             b.spec(stack, [base_model], f"base {i}", popularity="single"),
                                             warm=[base_model] if first else None))
            fly_runs.append(await b.measure(stack, f"defaults_flylora16_{i}",
                                            b.spec(stack, names, f"16 adapters {i}", popularity="uniform"),
                                            warm=names if first else None))
    base, fly = _rate(base_runs), _rate(fly_runs)
    table = {"base_tokens_per_s": base, "flylora16_tokens_per_s": fly, "flylora16_over_base": fly / base if base else None,
             "rounds": ROUNDS, "per_round_over_base": [f["output_tokens_per_s"] / r["output_tokens_per_s"]
                                                      if r["output_tokens_per_s"] else None
                                                      for r, f in zip(base_runs, fly_runs)],
             "failed": sum(r["failed"] for r in base_runs + fly_runs),
             "loadavg_1min_per_run": [r["loadavg_before"][0] for r in base_runs + fly_runs]}
    out = {"machine": machine(), "command": b.meta.get("command"), "stack": described, "adapters": kind.name, "settings": {
        "duration_s": b.duration_s, "concurrency": b.concurrency, "output_tokens": b.output_tokens,
        "ignore_eos": True, "prompt_words": [32, 96]}, "table": table, "session_s": time.monotonic() - t0,
        "runs": {k: v for k, v in b.results.items() if k.startswith("defaults_")}}
    b.out.mkdir(parents=True, exist_ok=True)
    write_json(b.out / "defaults_benchmark.json", out)
    text = (f"defaults ({described['max_loras']} slots, {described['max_cpu_loras']} cached, "
            f"{described['max_num_seqs']} seqs, {described['dtype']}): base {base:.1f} tok/s, 16 {kind.name} adapters "
            f"{fly:.1f} tok/s = {table['flylora16_over_base']:.2f}x base over {ROUNDS} alternating rounds "
            f"(per round {', '.join(f'{x:.2f}' for x in table['per_round_over_base'])}); {table['failed']} failed; "
            f"load avg (1 min) {', '.join(f'{x:.1f}' for x in table['loadavg_1min_per_run'])}; now "
            f"{os.getloadavg()[0]:.1f}")
    (b.out / "defaults_summary.txt").write_text(text + "\n")
    print(text, flush=True)
    return out
