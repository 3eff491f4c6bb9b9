"""Summaries of load runs, written as JSON and drawn as PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from loadtests.generator import LoadResult


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, ``q`` in [0, 100]; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _dist(values: list[float]) -> dict:
    return {"n": len(values), "mean": sum(values) / len(values) if values else None,
            "p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99)}


def summarize(result: LoadResult) -> dict:
    """Counts (issued = ok + failed), throughput, and TTFT / TPOT / end-to-end distributions."""
    ok, failed = result.ok, result.failed
    out_tokens = sum(r.output_tokens for r in ok)
    duration = result.duration_s or float("nan")
    return {
        "issued": len(result.records), "ok": len(ok), "failed": len(failed),
        "failures": {f"{s} {e}": c for (s, e), c in
                     Counter((r.status, (r.error or "")[:120]) for r in failed).most_common(10)},
        "duration_s": result.duration_s,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration if ok else 0.0,
        "requests_per_s": len(ok) / duration if ok else 0.0,
        "distinct_models": len({r.model for r in result.records}),
        "ttft_s": _dist([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _dist([r.tpot for r in ok if r.tpot is not None]),
        # Every gap between two tokens of every request (vLLM's benchmarks call it ITL), and each request's
        # longest one: where a stalled engine loop shows.
        "itl_s": _dist([g for r in ok for g in r.itl]),
        "max_itl_s": _dist([max(r.itl) for r in ok if r.itl]),
        "e2e_s": _dist([r.e2e for r in ok if r.e2e is not None]),
    }


def result_json(result: LoadResult) -> dict:
    return {"spec": result.spec, "started_at": result.started_at, "summary": summarize(result),
            "records": [{k: v for k, v in asdict(r).items() if k != "itl"} for r in result.records]}


def machine() -> dict:
    """The machine the numbers came from (CPU model, cores, load average now)."""
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        gpu = None
    return {"cpu": model, "cores": os.cpu_count(), "gpu": gpu, "loadavg": list(os.getloadavg()),
            "platform": platform.platform()}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_bars(path: Path, title: str, labels: list[str], values: list[float], ylabel: str,
              reference: float | None = None, reference_label: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, values, color="#4c72b0")
    for b, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v),
                    ha="center", va="bottom", fontsize=9)
    if reference is not None:
        ax.axhline(reference, color="#c44e52", linestyle="--", label=reference_label)
        ax.legend()
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(path: Path, title: str, xs: list[float], series: dict[str, list[float | None]], xlabel: str,
               ylabel: str, logx: bool = False, right: dict[str, list[float | None]] | None = None,
               right_label: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    lines, labels = ax.get_legend_handles_labels()
    if right:
        ax2 = ax.twinx()
        for name, ys in right.items():
            ax2.plot(xs, ys, marker="s", linestyle=":", color="#c44e52", label=name)
        ax2.set_ylabel(right_label)
        ax2.set_ylim(bottom=0)
        l2, lab2 = ax2.get_legend_handles_labels()
        lines, labels = lines + l2, labels + lab2
    ax.legend(lines, labels, fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
