"""Benchmark of one adapted layer's delta: our kernel vs vLLM's LoRA ops vs a naive per-token loop.

Usage: ``python -m flylora_runtime.bench.kernels [--quick] [--json PATH] [--threads N]``

One row per backend and shape (``backend, tokens, adapters_in_batch, hidden_in, hidden_out, r, k, dtype,
median_s, gbps``), all measured in one run so that ratios are comparable on a shared, noisy machine.

Backends (by the device: CPU here, CUDA when present):

- ``flylora-cpu`` / ``flylora-triton``: :func:`flylora_runtime.kernels.flylora_apply`, FlyLoRA (r, k).
- ``flylora-cpu-compactA``: the CPU backend on slots holding compact A (the sparse alternative).
- ``vllm-cpu-torch-ops``: vLLM's CPU LoRA path (``vllm.lora.ops.torch_ops.bgmv_shrink`` then
  ``bgmv_expand_slice``, as ``PunicaWrapperCPU.add_lora_linear`` calls them; its prefill ``sgmv_*`` ops
  only repeat the indices first), plain LoRA at the same r with dense A. Skipped without vllm.
- ``naive-per-token``: the ``reference`` backend, a Python loop over tokens.

``gbps`` is the bytes a backend must move at least (x read, out read and written, and the weights it
needs: A of every adapter in the batch, and B; k rows of B per token for FlyLoRA, all r columns of B per
adapter for plain LoRA) divided by the median time: a "useful bandwidth", comparable across backends.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..kernels import build_slots, flylora_apply
from ..reference import LayerAdapter

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


def _time(fn: Callable[[], None], budget_s: float, max_reps: int = 200) -> float:
    fn()  # warm-up (allocations, lazy imports, BLAS dispatch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def bench_shape(tokens: int, n_adapters: int, hidden: int, dtype: torch.dtype, device: str, budget_s: float,
                vllm_ops, naive: bool, compact_a: bool) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    n_adapters = min(n_adapters, tokens)
    adapters = [[_adapter(gen, hidden, hidden)] for _ in range(n_adapters)]
    slots = build_slots(adapters, b_dtype=dtype, device=device)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
    token_slot = (torch.arange(tokens) % n_adapters).to(torch.int32)
    token_slot = token_slot[torch.randperm(tokens, generator=gen)].to(device)
    out = torch.zeros(tokens, hidden, dtype=dtype, device=device)
    esz = torch.empty(0, dtype=dtype).element_size()
    act_bytes = tokens * hidden * esz * 3  # x read, out read + written
    b_fly = tokens * K * hidden * esz
    a_dense = n_adapters * R * hidden * 4  # fp32 dense A in our slots
    a_compact = n_adapters * R * (hidden // (R // K)) * 8  # fp32 values + int32 indices
    rows = []

    def row(name: str, fn: Callable[[], None], nbytes: int) -> None:
        med = _time(fn, budget_s)
        rows.append(Row(name, tokens, n_adapters, hidden, hidden, R, K, str(dtype).replace("torch.", ""), med,
                        nbytes / med / 1e9))

    ours = "flylora-cpu" if device == "cpu" else "flylora-triton"
    row(ours, lambda: flylora_apply(out, x, token_slot, slots, check_indices=False), act_bytes + a_dense + b_fly)
    if compact_a and device == "cpu":
        slots_c = build_slots(adapters, b_dtype=dtype, compact=True)
        row("flylora-cpu-compactA", lambda: flylora_apply(out, x, token_slot, slots_c, check_indices=False),
            act_bytes + a_compact + b_fly)
    if vllm_ops is not None and device == "cpu":
        shrink, expand_slice = vllm_ops
        lora_a = torch.stack([a[0].A for a in adapters]).to(dtype).unsqueeze(1).contiguous()  # [S, 1, r, in]
        lora_b = torch.stack([a[0].scaling * a[0].B for a in adapters]).to(dtype).unsqueeze(1).contiguous()
        idx = token_slot.long()
        buf = torch.zeros(tokens, R, dtype=torch.float32)

        def vllm_lora() -> None:
            shrink(x, lora_a, buf, idx, 1.0)
            expand_slice(buf, lora_b, out, idx, 0, hidden, True)

        row("vllm-cpu-torch-ops", vllm_lora, act_bytes + n_adapters * R * hidden * esz * 2)
    if naive:
        row("naive-per-token", lambda: flylora_apply(out, x, token_slot, slots, backend="reference",
                                                     check_indices=False), act_bytes + a_dense + b_fly)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small sweep (< 2 minutes on 2 CPU cores)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list to PATH")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    vllm_ops = _vllm_ops() if device == "cpu" else None
    if args.quick:
        shapes = [(t, a, 576) for t in (1, 16, 256) for a in (1, 8)] + [(16, 16, 576), (256, 8, 4096)]
        budget = 0.3
    else:
        shapes = [(t, a, h) for h in (576, 4096) for t in (1, 16, 256) for a in (1, 8, 64) if a <= t]
        budget = 1.0
    shapes = list(dict.fromkeys((t, min(a, t), h) for t, a, h in shapes))  # adapters <= tokens, no repeats
    rows: list[Row] = []
    print(f"# device={device} threads={torch.get_num_threads()} torch={torch.__version__}", flush=True)
    header = f"{'backend':22s} {'tokens':>6s} {'adapters':>8s} {'in':>5s} {'out':>5s} {'r':>3s} {'k':>3s} " \
             f"{'dtype':>8s} {'median_ms':>10s} {'GB/s':>7s} {'vs ours':>8s}"
    print(header, flush=True)
    for tokens, n_adapters, hidden in shapes:
        naive = tokens <= 16 or not args.quick
        shape_rows = bench_shape(tokens, n_adapters, hidden, dtype, device, budget, vllm_ops, naive,
                                 compact_a=hidden == 576)
        ours = shape_rows[0].median_s
        for r in shape_rows:
            print(f"{r.backend:22s} {r.tokens:6d} {r.adapters_in_batch:8d} {r.hidden_in:5d} {r.hidden_out:5d} "
                  f"{r.r:3d} {r.k:3d} {r.dtype:>8s} {r.median_s * 1e3:10.3f} {r.gbps:7.2f} "
                  f"{r.median_s / ours:7.2f}x", flush=True)
        rows += shape_rows
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
