"""``make gpu-check``: the FlyLoRA Triton kernel on one NVIDIA GPU, with PyTorch and Triton only (no vLLM, no
network), in a few minutes, as one JSON report (format: docs/KERNELS.md, "GPU check").

    python3 -m flylora_runtime.bench.gpu_check [--out gpu_check.json] [--quick]

Three parts, each recorded even when another fails:

1. ``tests``: ``tests/kernels/test_triton.py`` on the GPU (the whole case table against the reference;
   :mod:`.gpu_tests` runs it under pytest, or a minimal runner when pytest is absent);
2. ``cuda_graph``: one call per Llama-3.1-8B layer kind captured in a CUDA graph and replayed on new inputs,
   bit for bit against eager calls (:func:`.gpu_kernel.graph_check`);
3. ``benchmarks``: the kernel at decode (1, 16, 64 tokens, one adapter each) and prefill (2048 tokens, 4
   adapters) shapes of Llama-3.1-8B's four adapted layers, r=32 k=8, bf16, 64 slots, dense A (the engine's
   GPU layout) and compact A; its time against the bytes it must read (fraction of the device's memory
   bandwidth) and against a dense-LoRA PyTorch baseline (:mod:`.gpu_kernel`).

Exit status 0 when the tests and the graph check pass (benchmarks are numbers, not checks), 1 otherwise,
2 when no GPU is visible (unless ``--device cpu``: the self-test on CPU under ``TRITON_INTERPRET=1``, tiny
shapes, no graph check; the timings then mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

SCHEMA = "flylora-gpu-check/1"


def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def device_info(device: str) -> dict:
    import torch

    from flylora_runtime.bench.gpu_kernel import copy_bandwidth, peak_bandwidth

    if device != "cuda":
        return {"name": "cpu (TRITON_INTERPRET=1 self-test)", "total_memory_bytes": None, "peak_bandwidth_gbps": None,
                "copy_bandwidth_gbps": None}
    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "total_memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count, "peak_bandwidth_gbps": peak / 1e9 if peak else None,
            "copy_bandwidth_gbps": copy_bandwidth() / 1e9}


def _section(report: dict, name: str, fn) -> None:
    """Run one part; its exception becomes ``{"error": ...}`` in the report instead of ending the check."""
    t0 = time.monotonic()
    try:
        report[name] = fn()
    except Exception as exc:  # noqa: BLE001 - recorded, the other parts still run
        report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    report.setdefault("durations_s", {})[name] = time.monotonic() - t0
    print(f"[gpu-check] {name}: done in {report['durations_s'][name]:.1f} s", file=sys.stderr, flush=True)


def verdict(report: dict) -> dict:
    """``{"tests_ok", "cuda_graph_ok", "ok"}``: the tests ran and none failed; every graph replay was exact."""
    tests = report.get("tests") or {}
    if isinstance(tests.get("skipped"), str):  # --skip-tests
        tests_ok = None
    else:
        tests_ok = "error" not in tests and tests.get("failed", 1) == 0 and tests.get("passed", 0) > 0
    graph = report.get("cuda_graph")
    if isinstance(graph, dict) and graph.get("skipped"):
        graph_ok = None
    else:
        graph_ok = isinstance(graph, list) and bool(graph) and all(g["bit_exact"] for g in graph)
    return {"tests_ok": tests_ok, "cuda_graph_ok": graph_ok,
            "ok": tests_ok is not False and graph_ok is not False and "error" not in (report.get("benchmarks") or {})}


def run(args: argparse.Namespace) -> dict:
    import torch

    from flylora_runtime.bench import gpu_kernel as gk
    from flylora_runtime.bench.gpu_tests import ensure_safetensors, run_kernel_tests

    device = args.device
    stub = Path(args.out).resolve().parent / ".gpu_check_stubs"
    ensure_safetensors(stub)  # before the kernels are imported (they import safetensors for adapter files)
    t0 = time.monotonic()
    report: dict = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "command": "python3 -m flylora_runtime.bench.gpu_check " + " ".join(args.argv),
                    "host": platform.node(), "versions": _versions()}
    _section(report, "device", lambda: device_info(device))
    if not args.skip_tests:
        _section(report, "tests", lambda: run_kernel_tests(timeout_s=args.tests_timeout, runner=args.runner,
                                                           stub_dir=stub))
    else:
        report["tests"] = {"skipped": "--skip-tests"}
    quick = args.quick or device != "cuda"
    layers = gk.TINY_LAYERS if device != "cuda" else (
        {"qkv": gk.LLAMA_8B_LAYERS["qkv"], "down": gk.LLAMA_8B_LAYERS["down"]} if quick else gk.LLAMA_8B_LAYERS)
    shapes = gk.TINY_SHAPES if device != "cuda" else (gk.DECODE_PREFILL[1::2] if quick else gk.DECODE_PREFILL)
    slots = 4 if device != "cuda" else 64
    dtype = torch.bfloat16
    if device == "cuda":
        _section(report, "cuda_graph", lambda: gk.graph_check(layers, num_slots=16, r=32, k=8, dtype=dtype, tokens=16))
    else:
        report["cuda_graph"] = {"skipped": "no CUDA device: graph capture needs a GPU"}
    peak = (report["device"].get("peak_bandwidth_gbps") or 0) * 1e9 or None
    copy_bw = (report["device"].get("copy_bandwidth_gbps") or 0) * 1e9 or None

    def benchmarks() -> list[dict]:
        rows = []
        for layout in ("dense", "compact"):
            for name, (n_in, outs) in layers.items():
                for shape in shapes:
                    if time.monotonic() - t0 > args.budget_s:  # keep the whole check within its budget
                        report["benchmarks_left_out"] = report.get("benchmarks_left_out", 0) + 1
                        continue
                    rows.append(gk.bench_layer(name, n_in, outs, shape, num_slots=max(slots, shape.adapters),
                                               r=32 if device == "cuda" else 8, k=8 if device == "cuda" else 2,
                                               dtype=dtype, layout=layout, device=device, peak=peak, copy_bw=copy_bw))
                    r = rows[-1]
                    print(f"[gpu-check] {layout:7s} {name:7s} {shape.phase:7s} T={shape.tokens:<5d} "
                          f"{r['flylora_ms'] * 1e3:9.1f} us  {r['flylora_gbps']:8.1f} GB/s  dense LoRA "
                          f"{r['dense_lora_ms'] * 1e3:9.1f} us  ({r['speedup_vs_dense_lora']:.2f}x)",
                          file=sys.stderr, flush=True)
        return rows

    _section(report, "benchmarks", benchmarks)
    report["verdict"] = verdict(report)
    report["duration_s"] = time.monotonic() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python3 -m flylora_runtime.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON report (default gpu_check.json)")
    p.add_argument("--quick", action="store_true", help="two layer kinds and two shapes only")
    p.add_argument("--skip-tests", action="store_true", help="leave out the kernel tests")
    p.add_argument("--runner", choices=("auto", "pytest", "builtin"), default="auto",
                   help="how to run the kernel tests (auto: pytest when installed)")
    p.add_argument("--tests-timeout", type=float, default=240.0, help="seconds for the kernel tests (default 240)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="no benchmark row starts after this many seconds (default 420: the check ends within 8 min)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the self-test under TRITON_INTERPRET=1 (tiny shapes, no graph check)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton_kernels is imported
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"gpu-check: {sys.executable} lacks {exc.name}: the check needs PyTorch and Triton in the python "
              "that runs it (make gpu-check PYTHON=/path/to/python3)", file=sys.stderr)
        return 2

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False); on a machine without a "
              "GPU run the self-test with --device cpu", file=sys.stderr)
        return 2
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    v = report["verdict"]
    tests = report.get("tests", {})
    print(f"[gpu-check] tests {tests.get('passed', '-')} passed, {tests.get('failed', '-')} failed, "
          f"{tests.get('skipped', '-')} skipped; CUDA graph exact: {v['cuda_graph_ok']}; "
          f"{report['duration_s']:.0f} s; report {args.out}", file=sys.stderr)
    return 0 if v["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
