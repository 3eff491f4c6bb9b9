"""The compiled CPU kernel on whole SmolLM2-135M steps, in the engine's slot layout, against an earlier kernel.

Usage: ``python -m flylora_runtime.bench.step [--baseline-rev REV] [--threads N] [--rounds N] [--json PATH]``

What the vLLM plugin runs on CPU: 30 layers x 4 adapted calls (``qkv`` 576 -> 576+192+192, ``o``,
``gate_up`` 576 -> 1536+1536, ``down`` 1536 -> 576), 16 slots of r=32, k=8 adapters with the authors' sparse
A (a quarter of each row), packed compact A with 16-bit indices and column bitmasks, bf16 ``x``, ``out`` and
B. A is timed both ways the plugin stores it: fp32 values (fp32 engines) and bf16 values (bf16 engines).

Steps (tokens -> slots): ``decode16`` 16 tokens of 16 distinct adapters; ``decode16same`` 16 tokens of one
adapter (the difference is what distinct adapters cost); ``decode1`` one token;
``prefill96`` 96 tokens of one adapter; ``mixed`` 16 decode tokens plus prompts of 60 and 57 tokens of two
of those adapters (what a closed-loop load's steps look like).

``base linear`` times the base model's own matmuls on the same 120 calls (bf16 weights of the layers' shapes,
``torch.mm``): the part of an engine step the adapters are added to. For each step the
output gives ``base / (base + FlyLoRA bf16 A)``: the ratio of the engine's throughput with adapters to
without them that these layers allow. The rest of a real step (attention, norms, sampling) adds the same time
to both sides, which would lift the engine's ratio above it; on the shared 2-vCPU machine of
docs/BENCHMARKS.md the engine measured at or a little below it instead (its OpenMP threads share the cores).

Then the bytes each step must read from the slots (bf16 A: values, column words, the selected rows of B^T)
and the rate the kernel moves them at, against this machine's streaming read rate with the same threads
(a reduction over 512 MB, measured in the same run): how far the kernel is from a memory-bound one.

``read only`` reads exactly the pieces the kernel reads in each call (:func:`floor_pieces`: per slot and slice its
packed A values and column words, ``k`` rows of B^T per token) with the same threads and no arithmetic but a
sum, in the same shuffled rounds: the floor a kernel that overlapped all its arithmetic with its reads would
reach on this machine, and ``base / (base + read only)`` the ratio it would allow.

``--baseline-rev REV`` also builds ``flylora_cpu.c`` as of git revision ``REV`` (same flags) and times it on
the same fp32-A slots (kernels from before the bitmasks ignore them), and on the bf16-A slots too when that
kernel reads the bitmasks (what a bf16 engine ran then). Every round runs every variant once,
in a shuffled order; the table gives medians: thread CPU time with one thread (the default, steadier on a
shared machine), wall time with more.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flylora_runtime.training.random_adapters import sparse_A
from flylora_runtime.kernels import allocate_slots, load_slot, native
from flylora_runtime.paths import REPO_ROOT
from flylora_runtime.reference.ops import LayerAdapter
from flylora_runtime.bench.kernels import SMOLLM2_LAYERS, SMOLLM2_NUM_LAYERS

S, R, K = 16, 32, 8
STEPS = {
    "decode16": list(range(16)),
    "decode16same": [0] * 16,
    "decode1": [0],
    "prefill96": [0] * 96,
    "mixed": list(range(16)) + [0] * 60 + [1] * 57,
}


def build_layers(a_dtypes: tuple[torch.dtype, ...], seed: int = 0) -> dict[torch.dtype, list]:
    """Per A dtype, the 120 layer calls' slots (the same adapters in each)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[torch.dtype, list] = {dt: [] for dt in a_dtypes}
    for _ in range(SMOLLM2_NUM_LAYERS):
        for _name, n_in, outs in SMOLLM2_LAYERS:
            slots = {dt: allocate_slots(S, R, n_in, outs, max_nnz=n_in, packed=True, index_dtype=torch.int16,
                                        a_dtype=dt, b_dtype=torch.bfloat16) for dt in a_dtypes}
            for s in range(S):
                adapter = [LayerAdapter(A=sparse_A(R, K, n_in, gen), B=torch.randn(o, R, generator=gen) * 0.05,
                                        d=torch.randn(R, generator=gen) * 0.01, top_k=K, scaling=2.0) for o in outs]
                for dt in a_dtypes:
                    load_slot(slots[dt], s, adapter)
            for dt in a_dtypes:
                out[dt].append(slots[dt])
    return out


def step_bytes(layers: list, slot_list: list[int]) -> int:
    """The bytes a step must read at least from the adapters' slots: per distinct slot and slice, A's values
    and column words (``r * nnz`` values, ``r * ceil(in/16)`` 16-bit words), and the selected rows of B^T
    (``min(tokens * k, r)`` rows of ``out_i``); ``x``, ``out`` and the routing biases left out."""
    tokens: dict[int, int] = {}
    for s in slot_list:
        tokens[s] = tokens.get(s, 0) + 1
    total = 0
    for slots in layers:
        words = (slots.in_features + 15) // 16
        for s, n_t in tokens.items():
            ks, rs, _ = slots.host_meta[s]
            for i, (k, r) in enumerate(zip(ks, rs)):
                m = int(slots.a_nnz[s, i])
                total += r * m * slots.a_val.element_size() + 2 * r * words
                total += min(n_t * k, r) * slots.output_slices[i] * slots.b.element_size()
    return total


def stream_read_gbps(threads: int, nbytes: int = 512 << 20, rounds: int = 5) -> float:
    """This machine's streaming read rate with ``threads`` threads: the median of ``rounds`` reductions over
    ``nbytes`` (far more than any cache), in GB/s. What a kernel that only streamed its bytes could reach."""
    buf = torch.ones(nbytes // 2, dtype=torch.int16)
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        buf.max()
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times[1:])[rounds // 2] / 1e9


#: ``flylora_cpu_apply`` of kernels built before ``flylora_cpu_apply_slots`` existed (9cef01d): the same call
#: with every argument spelled out. Only old revisions export it; today's library does not.
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
LEGACY_ARGTYPES = [_I64, _I64, _I64, _I64, _I64, _I64, _PTR,  # T, in, n, R, S, P, out_off
                   _PTR, _I64, _INT, _PTR, _I64, _INT,  # x, stride, dtype; out, stride, dtype
                   _PTR, _INT, _PTR, _INT, _PTR, _INT, _PTR,  # a_val, a dtype, a_idx, idx bytes, a_nnz, packed, a_mask
                   _PTR, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _INT]  # b, b dtype, d, k, r, magnitude, token_slot, i64


def _compile(src: str, name: str) -> ctypes.CDLL:
    """C source ``src`` built with the kernel's flags into a temporary library, loaded."""
    tmp = Path(tempfile.mkdtemp(prefix=f"flylora-{name}-"))
    (tmp / "k.c").write_text(src)
    subprocess.run(["cc", *native.CFLAGS, "-o", str(tmp / "k.so"), str(tmp / "k.c"), "-lm"], check=True)
    return ctypes.CDLL(str(tmp / "k.so"))


#: The read-only floor: every piece of a table (start address, bytes) read whole, 64 bytes at a time, and summed;
#: the pieces of one item (a slot's tokens in one layer call, as the kernel's work items) by one thread, items
#: shared out as the kernel shares them (OpenMP, dynamic). No arithmetic beyond the sum: what reading exactly
#: the kernel's bytes, in its pieces, costs on this machine.
READER_C = r"""
#include <stdint.h>
#include <string.h>
typedef uint64_t v8 __attribute__((vector_size(64)));
uint64_t read_pieces(const int64_t *table, const int64_t *item_start, int64_t n_items) {
    v8 total = {0};
#pragma omp parallel
    {
        v8 acc = {0};
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t w = 0; w < n_items; w++)
            for (int64_t e = item_start[w]; e < item_start[w + 1]; e++) {
                /* whole 64-byte lines: the line of the first and of the last byte are in the piece's pages */
                const uintptr_t a = (uintptr_t)table[2 * e] & ~(uintptr_t)63, end = (uintptr_t)(table[2 * e] + table[2 * e + 1]);
                for (uintptr_t p = a; p < end; p += 64) {
                    v8 v;
                    memcpy(&v, (const void *)p, 64);
                    acc += v;
                }
            }
#pragma omp critical
        total += acc;
    }
    uint64_t s = 0;
    for (int i = 0; i < 8; i++) s += total[i];
    return s;
}
"""


def floor_pieces(token_slot: torch.Tensor, slots, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel reads for one call, as pieces: ``table`` ``[m, 2]`` int64 (address, bytes) and ``starts``
    (item ``w``'s pieces are rows ``starts[w]:starts[w+1]``). Per item (a slot's tokens, in blocks of 16, every
    slice): each slice's packed A values and column words, and per token ``k`` of its ``r`` rows of B^T drawn
    with ``rng`` (the kernel's top-k picks them by the data; the bytes and the pieces are the same). One token
    per slot (a decode step) is :func:`step_bytes`; more read A once per block and B rows once per token, as
    the kernel loads them (step_bytes counts each distinct byte once)."""
    rows, starts = [], [0]
    R, P = slots.max_rank, slots.a_val.shape[-1]
    ae, be = slots.a_val.element_size(), slots.b.element_size()
    per_slot: dict[int, int] = {}
    for s in token_slot.tolist():
        per_slot[s] = per_slot.get(s, 0) + 1
    for s, count in sorted(per_slot.items()):
        ks, rs, _ = slots.host_meta[s]
        a_flat, masks = slots.a_val[s].view(-1), slots.a_mask[s]  # slice i: a_flat[i*R*P:], masks[i*R:(i+1)*R]
        for first in range(0, count, 16):
            for i, oi in enumerate(slots.output_slices):
                r, b_rows = rs[i], slots.b_view(i)[s]
                rows.append((a_flat[i * R * P:].data_ptr(), ae * r * int(slots.a_nnz[s, i])))
                rows.append((masks[i * R].data_ptr(), masks[i * R:i * R + r].numel() * 2))
                for _t in range(min(16, count - first)):
                    rows += [(b_rows[j].data_ptr(), be * oi) for j in rng.sample(range(r), ks[i])]
            starts.append(len(rows))
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(starts, dtype=torch.int64)


def read_floor_call():
    """``call(out, x, token_slot, slots)`` that reads what the kernel reads for that call and nothing else
    (:func:`floor_pieces`, built once per call site), with :data:`READER_C`'s threads."""
    lib = _compile(READER_C, "reader")
    lib.read_pieces.argtypes, lib.read_pieces.restype = [_PTR, _PTR, _I64], ctypes.c_uint64
    cache: dict = {}
    rng = random.Random(2)

    def call(out, x, token_slot, slots):
        key = (id(slots), id(token_slot))  # the bench keeps both alive for the whole step: ids are stable
        if key not in cache:
            cache[key] = (*floor_pieces(token_slot, slots, rng), token_slot)
        table, starts, _ = cache[key]
        lib.read_pieces(table.data_ptr(), starts.data_ptr(), starts.numel() - 1)

    return call


def baseline_call(rev: str):
    """``call(out, x, token_slot, slots)`` running ``flylora_cpu.c`` of git revision ``rev``: through its
    ``flylora_cpu_apply_slots`` (the struct entry point, unchanged since it appeared) when it has one, else
    through the 28-argument ``flylora_cpu_apply`` of older builds."""
    src = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{rev}:flylora_runtime/kernels/flylora_cpu.c"],
                         capture_output=True, text=True, check=True).stdout
    lib = _compile(src, "baseline")
    has_mask = "a_mask" in src
    codes = native.DTYPE_CODES
    if hasattr(lib, "flylora_cpu_apply_slots"):
        fn = lib.flylora_cpu_apply_slots
        fn.argtypes, fn.restype = [_PTR, _I64, _PTR, _I64, _INT, _PTR, _I64, _INT, _PTR, _INT], ctypes.c_int

        def call(out, x, token_slot, slots):
            rc = fn(native.slot_args(slots), x.shape[0], x.data_ptr(), x.stride(0), codes[x.dtype], out.data_ptr(),
                    out.stride(0), codes[out.dtype], token_slot.data_ptr(), 0)
            if rc != 0:
                raise RuntimeError(f"baseline kernel returned {rc}")
    else:
        fn = lib.flylora_cpu_apply
        argtypes = list(LEGACY_ARGTYPES)
        if not has_mask:
            del argtypes[19]  # the argument after `packed`
        fn.argtypes, fn.restype = argtypes, ctypes.c_int

        def call(out, x, token_slot, slots):
            _, head, tail = native.static_args(slots)
            if not has_mask:
                tail = tail[:6] + tail[7:]
            rc = fn(x.shape[0], *head, x.data_ptr(), x.stride(0), codes[x.dtype], out.data_ptr(),
                    out.stride(0), codes[out.dtype], *tail, token_slot.data_ptr(), 0)
            if rc != 0:
                raise RuntimeError(f"baseline kernel returned {rc}")
    call.reads_masks = has_mask
    return call


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", metavar="REV", help="also time flylora_cpu.c of this git revision (fp32 A)")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP/torch threads (default 1)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds per variant (default 9)")
    ap.add_argument("--json", metavar="PATH", help="also write the medians as JSON to PATH")
    args = ap.parse_args(argv)
    lib = native.library()
    if lib is None:
        print("the compiled CPU kernel is unavailable here (no C compiler, or FLYLORA_CPU_NATIVE=0)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"building 120 layer calls x {S} slots (r={R}, k={K}, authors' sparse A) ...", file=sys.stderr, flush=True)
    layers = build_layers((torch.float32, torch.bfloat16))
    variants = {"fp32 A": (lambda o, x, t, s: native.apply_native(lib, o, x, t, s), torch.float32),
                "bf16 A": (lambda o, x, t, s: native.apply_native(lib, o, x, t, s), torch.bfloat16)}
    weights = [torch.randn(sum(s.output_slices), s.in_features, generator=torch.Generator().manual_seed(j))
               .to(torch.bfloat16) for j, s in enumerate(layers[torch.float32])]

    def base_linear(o, x, t, s, _w={id(s): w for s, w in zip(layers[torch.float32], weights, strict=True)}):
        torch.mm(x, _w[id(s)].t(), out=o)

    variants["base linear"] = (base_linear, torch.float32)
    variants["read only"] = (read_floor_call(), torch.bfloat16)
    if args.baseline_rev:
        call = baseline_call(args.baseline_rev)
        variants[f"{args.baseline_rev} (fp32 A)"] = (call, torch.float32)
        if call.reads_masks:  # kernels with the bitmasks read bf16 A too: the like-for-like bf16 engine case
            variants[f"{args.baseline_rev} (bf16 A)"] = (call, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(0)
    results: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for step, slot_list in STEPS.items():
            ts = torch.tensor(slot_list, dtype=torch.int32)
            T = len(slot_list)
            xs = [torch.randn(T, s.in_features, generator=gen).to(torch.bfloat16) for s in layers[torch.float32][:4]]
            outs = [torch.zeros(T, sum(s.output_slices), dtype=torch.bfloat16) for s in layers[torch.float32][:4]]

            def run(call, dt, outs=outs, xs=xs, ts=ts):
                for j, slots in enumerate(layers[dt]):
                    call(outs[j % 4], xs[j % 4], ts, slots)
            times: dict[str, list[float]] = {v: [] for v in variants}
            for v, (call, dt) in variants.items():
                run(call, dt)  # warm-up
            for _ in range(args.rounds):
                order = list(variants)
                rng.shuffle(order)
                for v in order:
                    call, dt = variants[v]
                    t0 = clock()
                    run(call, dt)
                    times[v].append(clock() - t0)
            results[step] = {v: sorted(t)[len(t) // 2] * 1e3 for v, t in times.items()}
            print(f"{step:10s} " + "  ".join(f"{v}: {ms:7.2f} ms" for v, ms in results[step].items()), flush=True)
    print("\nbase / (base + FlyLoRA bf16 A), the most a step with these adapters can reach of one without:")
    for step, r in results.items():
        print(f"{step:12s} {r['base linear'] / (r['base linear'] + r['bf16 A']):.2f}x   (FlyLoRA {r['bf16 A']:.2f} ms "
              f"on base {r['base linear']:.2f} ms)")
    stream = stream_read_gbps(args.threads)
    moved = {step: step_bytes(layers[torch.bfloat16], slot_list) for step, slot_list in STEPS.items()}
    print(f"\nbytes read from the slots (bf16 A) per step, and the rate the kernel moves them at, against this "
          f"machine's streaming read rate with {args.threads} thread(s), {stream:.1f} GB/s:")
    for step, r in results.items():
        rate = moved[step] / (r["bf16 A"] / 1e3) / 1e9
        print(f"{step:12s} {moved[step] / 1e6:6.1f} MB  {rate:5.1f} GB/s  ({rate / stream:.2f} of streaming)")
    print("\nthe kernel (bf16 A) against reading only its pieces (A's values and column words per slot and slice, k rows "
          "of B^T per token, summed, no arithmetic; \"read only\"), in the same rounds:")
    for step, r in results.items():
        print(f"{step:12s} read only {r['read only']:6.2f} ms  kernel {r['bf16 A']:6.2f} ms  ({r['bf16 A'] / r['read only']:.2f}x "
              f"the read; {r['base linear'] / (r['base linear'] + r['read only']):.2f}x of base with a kernel that only read)")
    if args.baseline_rev:
        base = f"{args.baseline_rev} (fp32 A)"
        print("\nratios against the baseline kernel (same fp32-A slots; bf16 A is what a bf16 engine runs):")
        base16 = f"{args.baseline_rev} (bf16 A)"
        for step, r in results.items():
            print(f"{step:10s} fp32 A {r['fp32 A'] / r[base]:.2f}x   bf16 A {r['bf16 A'] / r[base]:.2f}x" + (
                f"   bf16 A against the baseline's bf16 A {r['bf16 A'] / r[base16]:.2f}x" if base16 in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "unit": "ms per step",
                                               "steps": list(STEPS),
                                               "medians_ms": results, "stream_read_gbps": stream,
                                               "bf16_a_step_bytes": moved}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
