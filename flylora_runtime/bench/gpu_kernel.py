"""The Triton kernel on a GPU for ``make gpu-check``: CUDA-graph capture and replay against eager, bit for bit,
and timings against the bytes the kernel must read and against a dense-LoRA torch baseline.

Bytes a call must move at least (:func:`flylora_bytes`; the same rule for the baseline, :func:`lora_bytes`):

- ``x``: the rows that have an adapter, ``in`` values each; ``out``: those rows read and written;
- A: for every adapter in the batch, its real ranks' rows of every slice: ``r * in`` values in the dense
  layout, ``r * p`` values and indices in the compact one (the baseline: ``r * in`` in the LoRA dtype);
- B: FlyLoRA reads only selected experts: per adapter and slice ``min(r, k * tokens)`` rows of ``out_i``
  (each token picks ``k``; an adapter's tokens cannot need more than its ``r`` rows); the baseline reads all
  ``r`` columns of B per adapter; plus d (fp32, ``r`` per slice) and ``token_slot``.

Achieved bandwidth = those bytes / the median time (L2 flushed before every call, ``triton.testing.do_bench``);
the report gives it as a fraction of the device's peak (memory clock x bus width, from the device
properties, when the driver reports them) and of a measured device-to-device copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flylora_runtime.kernels import FlyLoRASlots, allocate_slots, load_slot, write_slot, prepare_slot
from flylora_runtime.reference.ops import LayerAdapter

#: Llama-3.1-8B's adapted layers as the engine calls them: name -> (in, output slices).
LLAMA_8B_LAYERS = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)),
                   "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,))}
#: Tiny shapes for the CPU self-test (TRITON_INTERPRET=1).
TINY_LAYERS = {"qkv": (64, (64, 16, 16)), "down": (96, (32,))}


@dataclass(frozen=True)
class Shape:
    phase: str  # "decode" or "prefill"
    tokens: int
    adapters: int  # distinct adapters in the batch (decode: one per token)


DECODE_PREFILL = (Shape("decode", 1, 1), Shape("decode", 16, 16), Shape("decode", 64, 64),
                  Shape("prefill", 2048, 4))
TINY_SHAPES = (Shape("decode", 2, 2), Shape("prefill", 8, 2))


def make_adapter(gen: torch.Generator, n_in: int, n_out: int, r: int, k: int) -> LayerAdapter:
    """The authors' init (``in / (r/k)`` nonzeros per row of A), B and d random; O(1) deltas."""
    p = max(1, n_in // max(1, r // k))
    cols = torch.rand(r, n_in, generator=gen).argsort(dim=1)[:, :p]
    A = torch.zeros(r, n_in).scatter_(1, cols, torch.randn(r, p, generator=gen) / r)
    B = torch.randn(n_out, r, generator=gen) * (r / math.sqrt(p * k)) * 0.5
    return LayerAdapter(A=A, B=B, d=torch.randn(r, generator=gen) * math.sqrt(p) / r, top_k=k, scaling=2.0)


def build_layer(n_in: int, outs: tuple[int, ...], n_adapters: int, *, num_slots: int, r: int, k: int,
                dtype: torch.dtype, layout: str, device: str, seed: int = 0):
    """``(slots, adapters)``: ``n_adapters`` adapters in slots ``0..n_adapters-1`` of ``num_slots``.
    ``layout``: ``dense`` (what the engine allocates on a GPU: fp32 A ``[n*R, in]``) or ``compact``
    (column indices and values, ``P = in / (r/k)`` per row, values in ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    adapters = [[make_adapter(gen, n_in, o, r, k) for o in outs] for _ in range(n_adapters)]
    extra = {} if layout == "dense" else {"max_nnz": max(1, n_in // max(1, r // k)), "a_dtype": dtype}
    slots = allocate_slots(num_slots, r, n_in, outs, b_dtype=dtype, device=device, **extra)
    for s, ws in enumerate(adapters):
        load_slot(slots, s, ws)
    return slots, adapters


def token_slots(shape: Shape, device: str) -> torch.Tensor:
    """Decode: token ``t`` on adapter ``t``. Prefill: ``adapters`` requests of equal length, one after another."""
    if shape.phase == "decode":
        ts = torch.arange(shape.tokens) % shape.adapters
    else:
        ts = torch.arange(shape.tokens) * shape.adapters // shape.tokens
    return ts.to(torch.int32).to(device)


def _per_slot_tokens(token_slot: torch.Tensor) -> dict[int, int]:
    ids, counts = torch.unique(token_slot.cpu(), return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts) if int(i) >= 0}


def flylora_bytes(slots: FlyLoRASlots, token_slot: torch.Tensor, x_bytes: int) -> int:
    """Bytes a FlyLoRA call must move at least (module docstring)."""
    per_slot = _per_slot_tokens(token_slot)
    rows = sum(per_slot.values())
    total = rows * slots.in_features * x_bytes + 2 * rows * sum(slots.output_slices) * x_bytes
    total += token_slot.numel() * token_slot.element_size()
    a_val, b = slots.a_val.element_size(), slots.b.element_size()
    idx = 0 if slots.a_idx is None else slots.a_idx.element_size()
    P = slots.in_features if slots.a_idx is None else slots.a_val.shape[-1]
    for s, n_tok in per_slot.items():
        k_s, r_s, _ = slots.host_meta[s]
        for i, out_i in enumerate(slots.output_slices):
            r, k = r_s[i], k_s[i]
            total += r * P * (a_val + idx) + r * 4 + min(r, k * n_tok) * out_i * b
    return total


def lora_bytes(n_in: int, outs: tuple[int, ...], r: int, token_slot: torch.Tensor, w_bytes: int, x_bytes: int) -> int:
    """Bytes a dense LoRA call (rank ``r``, A and B in ``w_bytes``) must move at least."""
    per_slot = _per_slot_tokens(token_slot)
    rows = sum(per_slot.values())
    total = rows * n_in * x_bytes + 2 * rows * sum(outs) * x_bytes + token_slot.numel() * token_slot.element_size()
    return total + len(per_slot) * sum(r * n_in + o * r for o in outs) * w_bytes


class DenseLoRA:
    """The baseline: plain LoRA of rank ``r`` (dense A ``[r, in]``, B ``[out, r]``, the model dtype) for the
    same adapters, in PyTorch. Two ways, the faster one counts: ``grouped`` (per adapter in the batch: its
    rows' ``x @ A^T @ B^T``; a Python loop over adapters, planned on the host once) and ``gathered`` (every
    token's A and B gathered, two batched matmuls; skipped above ``max_gather_bytes``)."""

    def __init__(self, adapters, dtype: torch.dtype, device: str, token_slot: torch.Tensor,
                 max_gather_bytes: int = 2**30):
        n = len(adapters[0])
        self.outs = [ws.B.shape[0] for ws in adapters[0]]
        self.A = [torch.stack([a[i].A for a in adapters]).to(device, dtype) for i in range(n)]  # [S, r, in]
        self.B = [torch.stack([a[i].scaling * a[i].B for a in adapters]).to(device, dtype) for i in range(n)]
        self.token_slot = token_slot.long()
        slots = token_slot.cpu()
        self.groups = [(int(s), (slots == s).nonzero().flatten().to(device)) for s in torch.unique(slots) if s >= 0]
        T, r, n_in = token_slot.numel(), self.A[0].shape[1], self.A[0].shape[2]
        gather = T * r * (n_in + max(self.outs)) * self.A[0].element_size()
        self.can_gather = gather <= max_gather_bytes

    def grouped(self, out: torch.Tensor, x: torch.Tensor) -> None:
        off = 0
        for i, o in enumerate(self.outs):
            for s, rows in self.groups:
                xs = x.index_select(0, rows)
                out[rows, off:off + o] += (xs @ self.A[i][s].T) @ self.B[i][s].T
            off += o

    def gathered(self, out: torch.Tensor, x: torch.Tensor) -> None:
        off = 0
        for i, o in enumerate(self.outs):
            y = torch.bmm(self.A[i][self.token_slot], x.unsqueeze(-1))  # [T, r, 1]
            out[:, off:off + o] += torch.bmm(self.B[i][self.token_slot], y).squeeze(-1)
            off += o


def peak_bandwidth(device: int = 0) -> float | None:
    """Bytes/s from the memory clock (kHz) and bus width (bits), double data rate; None when not reported."""
    props = torch.cuda.get_device_properties(device)
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2.0 * clock * 1e3 * bus / 8 if clock and bus else None


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes/s of a device-to-device copy (bytes read + bytes written over the median time)."""
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def time_ms(fn, device: str) -> float:
    """Median ms of ``fn``: ``triton.testing.do_bench`` (L2 flushed before every call) on a GPU; wall time of
    a few calls elsewhere (the CPU self-test, where the numbers mean nothing)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    import statistics
    import time

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_layer(name: str, n_in: int, outs: tuple[int, ...], shape: Shape, *, num_slots: int, r: int, k: int,
                dtype: torch.dtype, layout: str, device: str, peak: float | None, copy_bw: float | None) -> dict:
    """One row of the report's ``benchmarks``."""
    from flylora_runtime.kernels.triton_kernels import apply_triton, slice_table

    slots, adapters = build_layer(n_in, outs, shape.adapters, num_slots=num_slots, r=r, k=k, dtype=dtype,
                                  layout=layout, device=device)
    ts = token_slots(shape, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape.tokens, n_in, generator=gen).to(device, dtype)
    out = torch.zeros(shape.tokens, sum(outs), dtype=dtype, device=device)
    meta = slice_table(slots)
    fly_ms = time_ms(lambda: apply_triton(out, x, ts, slots, slice_meta=meta), device)
    base = DenseLoRA(adapters, dtype, device, ts)
    grouped_ms = time_ms(lambda: base.grouped(out, x), device)
    gathered_ms = time_ms(lambda: base.gathered(out, x), device) if base.can_gather else None
    best = min(t for t in (grouped_ms, gathered_ms) if t is not None)
    fb = flylora_bytes(slots, ts, x.element_size())
    lb = lora_bytes(n_in, outs, r, ts, x.element_size(), x.element_size())
    row = {"layer": name, "phase": shape.phase, "tokens": shape.tokens, "adapters": shape.adapters,
           "in": n_in, "outs": list(outs), "r": r, "k": k, "slots": num_slots, "dtype": str(dtype).removeprefix("torch."),
           "a_layout": layout, "flylora_ms": fly_ms, "dense_lora_grouped_ms": grouped_ms,
           "dense_lora_gathered_ms": gathered_ms, "dense_lora_ms": best, "speedup_vs_dense_lora": best / fly_ms,
           "flylora_bytes": fb, "dense_lora_bytes": lb}
    row.update(bandwidth_fields("flylora", fb, fly_ms, peak, copy_bw))
    row.update(bandwidth_fields("dense_lora", lb, best, peak, copy_bw))
    return row


def bandwidth_fields(prefix: str, nbytes: int, ms: float, peak: float | None, copy_bw: float | None) -> dict:
    """``{prefix}_gbps``, ``{prefix}_fraction_of_peak`` and ``{prefix}_fraction_of_copy`` (None when unknown)."""
    achieved = nbytes / (ms * 1e-3)
    return {f"{prefix}_gbps": achieved / 1e9, f"{prefix}_fraction_of_peak": achieved / peak if peak else None,
            f"{prefix}_fraction_of_copy": achieved / copy_bw if copy_bw else None}


def graph_check(layers: dict, *, num_slots: int, r: int, k: int, dtype: torch.dtype, tokens: int,
                replays: int = 3) -> list[dict]:
    """Capture one layer call in a CUDA graph and replay it on new inputs against eager calls, bit for bit.

    Two ways of calling, per layer: ``engine`` (as the plugin calls it: the slice table built once, the top-k
    workspaces allocated inside the call, from the graph's pool) and ``static`` (every workspace passed in).
    Between replays the inputs change (new x, a new slot per token with some rows at -1) and, before the last,
    an adapter is swapped into slot 0 in place, which the graph must see (it reads the live slot buffers).
    """
    from flylora_runtime.kernels.triton_kernels import apply_triton, slice_table

    results = []
    for name, (n_in, outs) in layers.items():
        slots, _ = build_layer(n_in, outs, num_slots, num_slots=num_slots, r=r, k=k, dtype=dtype,
                               layout="dense", device="cuda")
        meta = slice_table(slots)
        kp = 1 << (k - 1).bit_length()
        work = (torch.empty(tokens, len(outs), kp, dtype=torch.int32, device="cuda"),
                torch.empty(tokens, len(outs), kp, dtype=torch.float32, device="cuda"))
        for mode in ("engine", "static"):
            extra = {"slice_meta": meta} if mode == "engine" else {"slice_meta": meta, "sel_idx": work[0],
                                                                   "sel_val": work[1]}
            x = torch.zeros(tokens, n_in, dtype=dtype, device="cuda")
            ts = torch.zeros(tokens, dtype=torch.int32, device="cuda")
            out = torch.zeros(tokens, sum(outs), dtype=dtype, device="cuda")
            call = lambda: apply_triton(out, x, ts, slots, **extra)  # noqa: E731
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # compile and warm up outside the capture
                    call()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            gen = torch.Generator().manual_seed(7)
            equal, max_diff = [], 0.0
            for rep in range(replays):
                if rep == replays - 1:  # hot swap after capture: new weights in slot 0
                    fresh = [make_adapter(gen, n_in, o, r, k) for o in outs]
                    write_slot(slots, 0, prepare_slot(slots, fresh))
                new_x = torch.randn(tokens, n_in, generator=gen).to("cuda", dtype)
                new_ts = torch.randint(-1, num_slots, (tokens,), generator=gen).to(torch.int32)
                new_ts[0] = 0
                new_out = torch.randn(tokens, sum(outs), generator=gen).to("cuda", dtype)
                want = new_out.clone()
                apply_triton(want, new_x, new_ts.cuda(), slots, slice_meta=meta)
                x.copy_(new_x), ts.copy_(new_ts), out.copy_(new_out)
                graph.replay()
                torch.cuda.synchronize()
                equal.append(bool(torch.equal(out, want)))
                max_diff = max(max_diff, float((out.float() - want.float()).abs().max()))
            results.append({"layer": name, "mode": mode, "tokens": tokens, "replays": replays,
                            "bit_exact": all(equal), "per_replay": equal, "max_abs_diff": max_diff})
            del graph
    return results
