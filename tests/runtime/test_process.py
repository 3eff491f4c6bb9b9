"""flylora_runtime.engine.process: children in their own process group, readiness over HTTP, stop (SIGTERM then
SIGKILL to the whole group), restarts with backoff. The children are small Python HTTP servers on loopback."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from flylora_runtime.engine.process import (Backoff, ChildExited, ChildProcess, EngineProcess, GatewayProcess,
                                            Supervisor, free_port, group_members, probe, settings_env, wait_http)

#: argv[1] = port, argv[2] = modes: grandchild (start a sleeping grandchild, print its pid), ignore-term,
#: fail (print and exit 3 before serving), slow=<s> (wait before serving). Serves 200 on /health.
SERVER = r"""
import http.server, signal, subprocess, sys, time
port, modes = int(sys.argv[1]), sys.argv[2].split(",")
if "ignore-term" in modes:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "grandchild" in modes:
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("grandchild", g.pid, flush=True)
if "fail" in modes:
    print("boom: cannot start", flush=True)
    sys.exit(3)
for m in modes:
    if m.startswith("slow="):
        time.sleep(float(m[5:]))

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass

print("serving", flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def server(tmp_path: Path, modes: str = "", **kw) -> ChildProcess:
    port = free_port()
    return ChildProcess("toy", [sys.executable, "-c", SERVER, str(port), modes or "-"],
                        log_path=tmp_path / f"toy-{port}.log", ready_url=f"http://127.0.0.1:{port}/health", **kw)


def grandchild_pid(child: ChildProcess) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in child.log_path.read_text().splitlines():
            if line.startswith("grandchild "):
                return int(line.split()[1])
        time.sleep(0.05)
    raise AssertionError(f"no grandchild pid in {child.log_tail()}")


def test_start_waits_until_ready_and_stop_ends_the_whole_group(tmp_path):
    child = server(tmp_path, "grandchild,slow=0.5")
    with child:
        assert probe(child.ready_url)  # start() returned only once it answered
        grandchild = grandchild_pid(child)
        assert os.getpgid(grandchild) == child.pid  # the grandchild is in the child's own group
        assert os.getpgid(child.pid) != os.getpgid(0)  # ... which is not ours
        assert set(group_members(child.pid)) == {child.pid, grandchild}
        assert child.rss_bytes() > 1 << 20
    assert not child.alive() and child.returncode == -15  # SIGTERM
    assert group_members(child.pid) == []  # the grandchild went with it
    assert not probe(child.ready_url)


def test_stop_escalates_to_sigkill_after_the_grace_period(tmp_path):
    child = server(tmp_path, "ignore-term", grace=1.0).start()
    t0 = time.monotonic()
    assert child.stop() == -9
    assert 0.9 <= time.monotonic() - t0 < 10
    assert group_members(child.pid) == []


def test_a_child_that_exits_while_starting_raises_with_its_log_tail(tmp_path):
    child = server(tmp_path, "fail")
    with pytest.raises(ChildExited, match=r"toy exited with code 3(.|\n)*boom: cannot start"):
        child.start()
    assert not child.alive()


def test_a_child_that_is_not_ready_in_time_is_stopped(tmp_path):
    child = server(tmp_path, "slow=30", ready_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="toy not ready after 1 s"):
        child.start()
    assert time.monotonic() - t0 < 10 and not child.alive()


def test_wait_http_gives_up_when_a_watched_child_dies(tmp_path):
    doomed = server(tmp_path, "fail").spawn()
    with pytest.raises(ChildExited, match="toy exited with code 3"):
        wait_http(f"http://127.0.0.1:{free_port()}/ready", timeout=30, what="something", children=[doomed])


def test_kill_sends_sigkill_to_the_group_and_start_again_restarts(tmp_path):
    child = server(tmp_path, "grandchild").start()
    first, grandchild = child.pid, grandchild_pid(child)
    child.kill()
    assert child.returncode == -9 and not probe(child.ready_url)
    deadline = time.monotonic() + 10
    while group_members(first) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(first) == [], grandchild
    child.start()
    try:
        assert child.alive() and child.pid != first and probe(child.ready_url)
    finally:
        child.stop()


def test_backoff_doubles_up_to_the_cap():
    b = Backoff(initial=1, factor=2, cap=10)
    assert [b.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_supervisor_restarts_a_killed_child_with_backoff_and_logs_it(tmp_path):
    child = server(tmp_path).start()
    lines: list[str] = []
    sup = Supervisor(child, backoff=Backoff(initial=0.3, factor=2, cap=0.6, reset_after=60), log=lines.append)
    pids = [child.pid]
    for _ in range(3):  # three deaths in a row: delays 0.3, 0.6 (cap), 0.6
        child.kill()
        deadline = time.monotonic() + 30
        while (sup.down or not child.alive()) and time.monotonic() < deadline:
            sup.poll()
            time.sleep(0.05)
        assert child.alive() and probe(child.ready_url), lines
        pids.append(child.pid)
    try:
        assert len(set(pids)) == 4 and sup.restarts == 3 and len(sup.downtimes) == 3
        assert all(0.3 <= d < 20 for d in sup.downtimes), sup.downtimes
        died = [line for line in lines if "exited with code -9" in line]
        assert [line.split("restarting it in ")[1].split(" s")[0] for line in died] == ["0.3", "0.6", "0.6"], died
        assert sum("serving again" in line for line in lines) == 3
        assert sup.downtimes[1] >= 0.6 and sup.downtimes[2] >= 0.6
    finally:
        child.stop()


def test_supervisor_starts_over_after_a_healthy_stretch(tmp_path):
    child = server(tmp_path).start()
    sup = Supervisor(child, backoff=Backoff(initial=0.1, factor=10, cap=100, reset_after=0.5), log=lambda _: None)
    try:
        for _ in range(2):
            time.sleep(0.6)  # longer than reset_after: each death is the first in a row
            child.kill()
            while sup.down or not child.alive():
                sup.poll()
                time.sleep(0.05)
            assert sup.failures == 1
    finally:
        child.stop()


def test_engine_process_runs_the_launcher_with_the_config_as_options(tmp_path, demo_model_dir):
    from flylora_runtime.engine.launcher import EngineConfig, build_parser

    config = EngineConfig(model=str(demo_model_dir), adapter_store=str(tmp_path), port=free_port(), dtype="float32",
                          max_loras=2, max_cpu_loras=3, flylora=False)
    proc = EngineProcess(config, tmp_path / "engine.log")
    assert proc.argv[:3] == [sys.executable, "-m", "flylora_runtime.engine"]
    assert EngineConfig(**vars(build_parser().parse_args(proc.argv[3:]))) == config
    assert proc.ready_url == f"http://127.0.0.1:{config.port}/health"
    bad = EngineProcess(EngineConfig(model=str(tmp_path), port=free_port()), tmp_path / "bad.log")
    with pytest.raises(ValueError, match="config.json"):  # refused before anything starts
        bad.start()
    assert bad.proc is None


def test_gateway_process_settings_become_flylora_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYLORA_DATABASE_URL", "postgresql://elsewhere")
    env = settings_env({"engine_urls": ["http://a:1", "http://b:2"], "admin_key": "k"}, inherit=False)
    assert env["FLYLORA_ENGINE_URLS"] == "http://a:1,http://b:2" and env["FLYLORA_ADMIN_KEY"] == "k"
    assert "FLYLORA_DATABASE_URL" not in env and env["PATH"] == os.environ["PATH"]
    assert settings_env({}, inherit=True)["FLYLORA_DATABASE_URL"] == "postgresql://elsewhere"
    gw = GatewayProcess(tmp_path / "gw.log", port=1234, settings={"admin_key": "k"}, ready_path="/health")
    assert gw.argv[1:3] == ["-m", "server.cli"] and gw.url == "http://127.0.0.1:1234"
    assert gw.env["FLYLORA_GATEWAY_PORT"] == "1234" and gw.ready_url == "http://127.0.0.1:1234/health"
