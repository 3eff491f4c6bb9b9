"""Benchmark of one adapted layer's delta: our kernel vs vLLM's LoRA ops vs a naive per-token loop.

Usage: ``python -m flylora_runtime.bench.kernels [--quick] [--json PATH] [--plot PATH] [--threads N]
[--baseline-rev REV]``

One row per backend and shape (``backend, tokens, adapters_in_batch, hidden_in, hidden_out, r, k, dtype,
median_s, gbps, layer, slots``), all measured in one run so that ratios are comparable on a shared, noisy
machine. Everything runs under ``torch.inference_mode()``, as in the engine. Two parts:

- The issue's table: one single-slice layer (``layer="single"``, in = out = hidden), tokens 1, 16, 256,
  adapters per batch 1, 8, 64 (at most one per token), hidden 576 and 4096, r=32, k=8; ``slots`` =
  adapters in the batch.
- A decode step of SmolLM2-135M's adapted layers as the vLLM plugin calls them (``layer`` = ``qkv``
  576 -> 576+192+192, ``o`` 576 -> 576, ``gate_up`` 576 -> 1536+1536, ``down`` 1536 -> 576), 16 slots
  (``--max-loras``), tokens 1, 4, 16, 64 with one distinct adapter per token (up to 16). The printed
  "step" line sums the four layers and multiplies by 30 layers: the kernel's share of one decode step.

Backends (by the device: CPU here, CUDA when present):

- ``flylora-cpu`` / ``flylora-triton``: :func:`flylora_runtime.kernels.flylora_apply`, FlyLoRA (r, k); on
  CPU the compiled kernel (:mod:`flylora_runtime.kernels.native`) when it can be built, as in the engine.
- ``flylora-cpu-torch``: the CPU backend's torch paths (small path at ``T <= SMALL_T``, grouped above):
  the fallback without a C compiler, and what the engine ran before the compiled kernel.
- ``flylora-cpu-compactA``: the CPU backend on slots holding compact A (the sparse alternative).
- ``flylora-cpu@REV`` (``--baseline-rev REV``): the CPU backend of an earlier git revision, same slots.
- ``vllm-cpu-torch-ops``: vLLM's CPU LoRA path (``vllm.lora.ops.torch_ops.bgmv_shrink`` then
  ``bgmv_expand_slice``, as ``PunicaWrapperCPU.add_lora_linear`` calls them; its prefill ``sgmv_*`` ops
  only repeat the indices first), plain LoRA at the same r with dense A, one shrink and one expand per
  slice. Skipped without vllm.
- ``naive-per-token``: the ``reference`` backend, a Python loop over tokens.

``gbps`` is the bytes a backend must move at least (x read, out read and written, and the weights it
needs: A of every adapter in the batch, and B; k rows of B per token for FlyLoRA, all r columns of B per
adapter for plain LoRA) divided by the median time: a "useful bandwidth", comparable across backends.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from flylora_runtime.kernels import build_slots, check_inputs, flylora_apply
from flylora_runtime.kernels.cpu import SMALL_T, apply_cpu
from flylora_runtime.reference.ops import LayerAdapter

R, K = 32, 8


@dataclass
class Row:
    backend: str
    tokens: int
    adapters_in_batch: int
    hidden_in: int
    hidden_out: int
    r: int
    k: int
    dtype: str
    median_s: float
    gbps: float
    layer: str = "single"
    slots: int = 0


def _time_interleaved(fns: list[Callable[[], None]], budget_s: float, max_reps: int = 200) -> list[float]:
    """Median seconds of each of ``fns``, timed round-robin (one call of each per round) so that a burst of
    load from other processes on the shared machine slows every backend alike and ratios stay fair. The
    order is shuffled every round (fixed seed): whoever runs right after a cache-thrashing backend (vLLM's
    per-token weight copies, the naive loop) pays for refilling the caches, so every backend must follow
    every other one equally often (a fixed or rotating order keeps the same predecessors)."""
    for fn in fns:
        fn()  # warm-up (allocations, lazy imports, BLAS dispatch)
    times: list[list[float]] = [[] for _ in fns]
    start, rnd, rng = time.perf_counter(), 0, random.Random(0)
    order = list(range(len(fns)))
    while rnd < max(3, len(fns)) or (time.perf_counter() - start < budget_s * len(fns) and rnd < max_reps):
        rng.shuffle(order)
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
        rnd += 1
    return [statistics.median(ts) for ts in times]


def _adapter(gen: torch.Generator, n_in: int, n_out: int) -> LayerAdapter:
    p = n_in // (R // K)
    cols = torch.rand(R, n_in, generator=gen).argsort(dim=1)[:, :p]
    A = torch.zeros(R, n_in).scatter_(1, cols, torch.randn(R, p, generator=gen) / R)
    return LayerAdapter(A=A, B=torch.randn(n_out, R, generator=gen) * 0.01, d=torch.randn(R, generator=gen) * 0.01,
                        top_k=K, scaling=2.0)


def _vllm_ops():
    try:
        from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink
    except Exception as exc:  # vllm missing or broken: the rest of the bench still runs
        print(f"# vllm torch ops unavailable ({type(exc).__name__}: {exc}); skipping that backend", file=sys.stderr)
        return None
    return bgmv_shrink, bgmv_expand_slice


def load_baseline(rev: str):
    """The CPU backend's ``apply_cpu`` as of git revision ``rev`` (its ``kernels/cpu.py`` run against
    today's slots), for before/after rows in the same run. Needs a git checkout."""
    import importlib.util
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:flylora_runtime/kernels/cpu.py"],
                         check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("flylora_runtime.kernels._baseline_cpu", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "flylora_runtime.kernels"
    exec(compile(src, f"{rev}:kernels/cpu.py", "exec"), mod.__dict__)  # noqa: S102 - our own file
    return mod.apply_cpu


def bench_shape(tokens: int, n_adapters: int, n_in: int, outs: tuple[int, ...], dtype: torch.dtype, device: str,
                budget_s: float, vllm_ops, *, naive: bool, compact_a: bool, n_slots: int | None = None,
                layer: str = "single", baseline: tuple[str, Callable] | None = None) -> list[Row]:
    """Time every backend on one layer shape; ``n_slots`` slots (default: the adapters in the batch)."""
    gen = torch.Generator().manual_seed(0)
    n_adapters = min(n_adapters, tokens)
    n_slots = max(n_slots or n_adapters, n_adapters)
    adapters = [[_adapter(gen, n_in, o) for o in outs] for _ in range(n_slots)]
    slots = build_slots(adapters, b_dtype=dtype, device=device)
    x = torch.randn(tokens, n_in, generator=gen).to(dtype).to(device)
    token_slot = (torch.arange(tokens) % n_adapters).to(torch.int32)
    token_slot = token_slot[torch.randperm(tokens, generator=gen)].to(device)
    n_out = sum(outs)
    out = torch.zeros(tokens, n_out, dtype=dtype, device=device)
    esz = torch.empty(0, dtype=dtype).element_size()
    act_bytes = tokens * (n_in + 2 * n_out) * esz  # x read, out read + written
    b_fly = tokens * K * n_out * esz
    a_dense = n_adapters * len(outs) * R * n_in * 4  # fp32 dense A in our slots
    a_compact = n_adapters * len(outs) * R * (n_in // (R // K)) * 8  # fp32 values + int32 indices
    todo: list[tuple[str, Callable[[], None], int]] = []

    def row(name: str, fn: Callable[[], None], nbytes: int) -> None:
        todo.append((name, fn, nbytes))

    ours = "flylora-cpu" if device == "cpu" else "flylora-triton"
    row(ours, lambda: flylora_apply(out, x, token_slot, slots, check_indices=False), act_bytes + a_dense + b_fly)
    if device == "cpu":
        torch_path = "small" if tokens <= SMALL_T else "grouped"

        def torch_ops() -> None:
            check_inputs(out, x, token_slot, slots, check_indices=False)
            apply_cpu(out, x, token_slot, slots, path=torch_path)

        row("flylora-cpu-torch", torch_ops, act_bytes + a_dense + b_fly)
    if baseline is not None and device == "cpu":
        def before() -> None:
            check_inputs(out, x, token_slot, slots, check_indices=False)
            baseline[1](out, x, token_slot, slots)

        row(f"flylora-cpu@{baseline[0]}", before, act_bytes + a_dense + b_fly)
    if compact_a and device == "cpu":
        slots_c = build_slots(adapters, b_dtype=dtype, compact=True)
        row("flylora-cpu-compactA", lambda: flylora_apply(out, x, token_slot, slots_c, check_indices=False),
            act_bytes + a_compact + b_fly)
    if vllm_ops is not None and device == "cpu":
        shrink, expand_slice = vllm_ops
        # [S, 1, r, in] and [S, 1, out_i, r] per slice, in the LoRA dtype, as vLLM stacks them.
        lora_a = [torch.stack([a[i].A for a in adapters]).to(dtype).unsqueeze(1).contiguous() for i in range(len(outs))]
        lora_b = [torch.stack([a[i].scaling * a[i].B for a in adapters]).to(dtype).unsqueeze(1).contiguous()
                  for i in range(len(outs))]
        offsets = [sum(outs[:i]) for i in range(len(outs))]
        idx = token_slot.long()

        def vllm_lora() -> None:  # PunicaWrapperCPU.add_lora_linear: fp32 buffers, shrink then expand per slice
            bufs = [torch.zeros(tokens, R, dtype=torch.float32) for _ in outs]
            for i, o in enumerate(outs):
                shrink(x, lora_a[i], bufs[i], idx, 1.0)
            for i, o in enumerate(outs):
                expand_slice(bufs[i], lora_b[i], out, idx, offsets[i], o, True)

        row("vllm-cpu-torch-ops", vllm_lora, act_bytes + n_adapters * R * (n_in + n_out) * esz)
    if naive:
        row("naive-per-token", lambda: flylora_apply(out, x, token_slot, slots, backend="reference",
                                                     check_indices=False), act_bytes + a_dense + b_fly)
    meds = _time_interleaved([fn for _, fn, _ in todo], budget_s)
    return [Row(name, tokens, n_adapters, n_in, n_out, R, K, str(dtype).replace("torch.", ""), med,
                nbytes / med / 1e9, layer, n_slots) for (name, _, nbytes), med in zip(todo, meds)]


#: SmolLM2-135M's adapted layers as the plugin calls them: (name, in, output slices).
SMOLLM2_LAYERS = (("qkv", 576, (576, 192, 192)), ("o", 576, (576,)), ("gate_up", 576, (1536, 1536)),
                  ("down", 1536, (576,)))
SMOLLM2_NUM_LAYERS = 30


def _print_rows(shape_rows: list[Row]) -> None:
    ours = shape_rows[0].median_s
    for r in shape_rows:
        print(f"{r.backend:22s} {r.layer:8s} {r.tokens:6d} {r.adapters_in_batch:8d} {r.slots:5d} {r.hidden_in:5d} "
              f"{r.hidden_out:5d} {r.dtype:>8s} {r.median_s * 1e3:10.3f} {r.gbps:7.2f} "
              f"{r.median_s / ours:7.2f}x", flush=True)


def step_summary(rows: list[Row]) -> list[dict]:
    """Per (backend, tokens): the four SmolLM2 layers summed, x 30 layers (ms per decode step)."""
    acc: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        if r.layer != "single":
            acc.setdefault((r.backend, r.tokens), []).append(r)
    return [{"backend": b, "tokens": t, "adapters_in_batch": rs[0].adapters_in_batch,
             "step_ms": 1e3 * SMOLLM2_NUM_LAYERS * sum(r.median_s for r in rs)}
            for (b, t), rs in acc.items() if len(rs) == len(SMOLLM2_LAYERS)]


def plot(rows: list[Row], steps: list[dict], path: str, title: str) -> None:
    """Two panels: the issue's table as time relative to ours, and the decode-step estimate per backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    single = [r for r in rows if r.layer == "single"]
    shapes = list(dict.fromkeys((r.tokens, r.adapters_in_batch, r.hidden_in) for r in single))
    ours = {(r.tokens, r.adapters_in_batch, r.hidden_in): r.median_s for r in single if r.backend == "flylora-cpu"}
    backends = [b for b in dict.fromkeys(r.backend for r in single)]
    width = 0.8 / max(1, len(backends))
    for j, b in enumerate(backends):
        xs, ys = [], []
        for i, sh in enumerate(shapes):
            m = [r.median_s for r in single if r.backend == b and (r.tokens, r.adapters_in_batch, r.hidden_in) == sh]
            if m:
                xs.append(i + (j - (len(backends) - 1) / 2) * width)
                ys.append(m[0] / ours[sh])
        ax1.bar(xs, ys, width, label=b)
    ax1.set_xticks(range(len(shapes)), [f"T{t}\nA{a}\nh{h}" for t, a, h in shapes], fontsize=7)
    ax1.set_yscale("log")
    ax1.axhline(1.0, color="k", lw=0.5)
    ax1.set_ylabel("median time / flylora-cpu (log)")
    ax1.set_title("one layer, r=32 k=8 (T tokens, A adapters, h hidden)")
    ax1.legend(fontsize=7)
    for b in dict.fromkeys(st["backend"] for st in steps):
        pts = sorted((st["tokens"], st["step_ms"]) for st in steps if st["backend"] == b)
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("decode tokens in the batch (one distinct adapter each, up to 16)")
    ax2.set_ylabel("ms per step (4 layers x 30)")
    ax2.set_title("SmolLM2-135M adapted layers, 16 slots")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small sweep (< 2 minutes on 2 CPU cores)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows (and step sums) as JSON to PATH")
    ap.add_argument("--plot", metavar="PATH", help="also write a PNG plot to PATH (needs matplotlib)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--max-loras", type=int, default=16, help="slots per layer in the decode-step part")
    ap.add_argument("--skip-table", action="store_true", help="only the decode-step part")
    ap.add_argument("--baseline-rev", metavar="REV", help="also time the CPU backend of git revision REV")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    vllm_ops = _vllm_ops() if device == "cpu" else None
    baseline = (args.baseline_rev, load_baseline(args.baseline_rev)) if args.baseline_rev else None
    if args.quick:
        shapes = [(t, a, 576) for t in (1, 16, 256) for a in (1, 8)] + [(16, 16, 576), (256, 8, 4096)]
        decode_tokens, budget = (1, 16), 0.2
    else:
        shapes = [(t, a, h) for h in (576, 4096) for t in (1, 16, 256) for a in (1, 8, 64)]
        decode_tokens, budget = (1, 4, 16, 64), 0.5
    shapes = list(dict.fromkeys((t, min(a, t), h) for t, a, h in shapes))  # adapters <= tokens, no repeats
    if args.skip_table:
        shapes = []
    rows: list[Row] = []
    print(f"# device={device} threads={torch.get_num_threads()} torch={torch.__version__}", flush=True)
    print(f"{'backend':22s} {'layer':8s} {'tokens':>6s} {'adapters':>8s} {'slots':>5s} {'in':>5s} {'out':>5s} "
          f"{'dtype':>8s} {'median_ms':>10s} {'GB/s':>7s} {'vs ours':>8s}", flush=True)
    t_start = time.perf_counter()
    with torch.inference_mode():
        for tokens, n_adapters, hidden in shapes:
            naive = tokens <= 16 or (not args.quick and hidden == 576)
            shape_rows = bench_shape(tokens, n_adapters, hidden, (hidden,), dtype, device, budget, vllm_ops,
                                     naive=naive, compact_a=hidden == 576 and tokens > 1, baseline=baseline)
            _print_rows(shape_rows)
            rows += shape_rows
        for tokens in decode_tokens:
            for name, n_in, outs in SMOLLM2_LAYERS:
                shape_rows = bench_shape(tokens, min(tokens, args.max_loras), n_in, outs, dtype, device, budget,
                                         vllm_ops, naive=tokens <= 16, compact_a=False, n_slots=args.max_loras,
                                         layer=name, baseline=baseline)
                _print_rows(shape_rows)
                rows += shape_rows
    steps = step_summary(rows)
    for st in steps:
        print(f"# step estimate {st['backend']:22s} tokens {st['tokens']:3d}: {st['step_ms']:8.2f} ms", flush=True)
    print(f"# total {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rows": [asdict(r) for r in rows], "decode_step": steps}, fh, indent=1)
    if args.plot:
        plot(rows, steps, args.plot, f"{device}, {torch.get_num_threads()} thread(s), {args.dtype}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
