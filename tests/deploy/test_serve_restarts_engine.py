"""``make serve`` (``python -m server.stack``) survives ``kill -9`` of its engine and answers again on its own.

The stack runs as ``make serve`` runs it (real engine, real gateway, both its children), on free loopback ports,
in a fresh data folder, with ``--no-demo-adapters`` (its printed example then asks the base model, and nothing
needs training). Once its example has answered, the engine's whole process group is SIGKILLed. Then:

- the gateway keeps running (same pid) and says so: ``/ready`` turns 503, completions get a 503 OpenAI error;
- the stack restarts the engine by itself and logs the exit, the restart and the recovery;
- the printed example answers again within ``BOUND_S``; the time from the kill to the first answer is printed
  (run with ``-s``);
- SIGTERM then stops the stack, its gateway and its new engine, and it exits 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from flylora_runtime.engine.process import ChildProcess, free_port, group_members

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

#: From the kill to the example answering again: the engine's start (20-60 s alone here, several times that on
#: a loaded 2-core machine) plus the first restart's 1 s delay and the gateway's health check.
BOUND_S = 420
PROMPT = "Write one sentence about the sea."


def _wait_for_line(stack: ChildProcess, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, stack.log_path.read_text(errors="replace"))
        if m:
            return m
        assert stack.alive(), f"make serve exited with {stack.returncode}:\n{stack.log_tail(60)}"
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not in the stack's log after {timeout:.0f} s:\n{stack.log_tail(60)}")


def _children(stack: ChildProcess) -> dict[str, int]:
    """{"engine": pid, "gateway": pid}: the stack's two children (each leads its own process group)."""
    out = {}
    for p in psutil.Process(stack.pid).children():
        cmd = " ".join(p.cmdline())
        out["gateway" if "server.cli" in cmd else "engine"] = p.pid
    assert set(out) == {"engine", "gateway"}, out
    return out


def _ask(url: str, key: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
                            "messages": [{"role": "user", "content": PROMPT}]})


def test_make_serve_restarts_a_killed_engine_and_answers_again(demo_model_dir):
    data = Path(tempfile.mkdtemp(prefix="fl-serve-"))  # short: vLLM's IPC socket paths live under it
    gateway_port, engine_port = free_port(), free_port()
    url = f"http://127.0.0.1:{gateway_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYLORA_")}
    env.update({"FLYLORA_DATA_DIR": str(data), "FLYLORA_BASE_MODEL_DIR": str(demo_model_dir),
                "FLYLORA_GATEWAY_HOST": "127.0.0.1", "FLYLORA_GATEWAY_PORT": str(gateway_port),
                "FLYLORA_ENGINE_HOST": "127.0.0.1", "FLYLORA_ENGINE_PORT": str(engine_port),
                "FLYLORA_ADMIN_KEY": "serve-restart-admin-key-not-secret-0123456789"})
    stack = ChildProcess("make serve", [sys.executable, "-m", "server.stack", "--no-demo-adapters"], env=env,
                         log_path=data / "serve.log", grace=90)
    started: set[int] = set()
    report: dict[str, object] = {"load_average_start": os.getloadavg()}
    try:
        t0 = time.monotonic()
        stack.spawn()
        _wait_for_line(stack, r"\[serve\] serving; press Ctrl-C", timeout=900)
        report["stack_start_s"] = round(time.monotonic() - t0, 1)
        key = _wait_for_line(stack, r"export FLYLORA_KEY=(\S+)", timeout=5).group(1)
        before = _children(stack)
        started |= set(before.values())
        assert os.getpgid(before["engine"]) == before["engine"]  # the engine leads its own group
        assert _ask(url, key).status_code == 200

        os.killpg(before["engine"], signal.SIGKILL)
        killed = time.monotonic()
        statuses: dict[int, int] = {}
        ready_503 = False
        while True:
            elapsed = time.monotonic() - killed
            assert elapsed < BOUND_S, f"no answer {BOUND_S} s after the kill; {statuses}:\n{stack.log_tail(60)}"
            assert stack.alive(), f"make serve exited with {stack.returncode}:\n{stack.log_tail(60)}"
            ready_503 = ready_503 or httpx.get(url + "/ready", timeout=10).status_code == 503
            try:
                r = _ask(url, key)
            except httpx.TransportError as exc:  # the gateway itself must keep answering
                raise AssertionError(f"the gateway did not answer after the kill: {exc!r}") from exc
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                back = time.monotonic()
                break
            err = r.json()["error"]  # while the engine is down: a clean OpenAI error
            assert r.status_code == 503 and {"message", "type", "param", "code"} <= set(err), (r.status_code, r.text)
            time.sleep(0.5)
        assert r.json()["choices"][0]["message"]["content"]
        report["death_to_serving_s"] = round(back - killed, 1)
        report["answers_while_down"] = statuses
        assert ready_503, "the gateway never reported not ready while its engine was down"
        after = _children(stack)
        started |= set(after.values())
        assert after["gateway"] == before["gateway"]  # the gateway was not restarted
        assert after["engine"] != before["engine"]
        log = stack.log_path.read_text(errors="replace")
        assert re.search(r"engine exited with code -9 after \d+ s; restarting it in 1 s \(restart 1\)", log), log
        assert "engine restarted (pid" in log
        logged = re.search(r"engine is serving again, ([\d.]+) s after it died", log)
        assert logged, log
        report["stack_logged_downtime_s"] = float(logged.group(1))

        assert stack.stop() == 0, stack.log_tail(40)  # SIGTERM: the stack stops its children, then exits 0
        for pid in started:
            assert group_members(pid) == [], f"process group {pid} outlived make serve"
    finally:
        stack.stop()
        for pid in started:  # whatever a failure left behind
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        report["load_average_end"] = os.getloadavg()
        print("\nSERVE-RESTART REPORT " + json.dumps(report))
        shutil.rmtree(data, ignore_errors=True)
