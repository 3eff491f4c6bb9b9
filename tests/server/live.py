"""A real gateway process (``python -m server.cli``, real HTTP on loopback) and the ``flylora`` command line run as
a process against it, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
GATEWAY_ADMIN_KEY = "live-admin-key-not-secret-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any FLYLORA_* variable, plus ``extra``; this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYLORA_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


class GatewayProcess:
    """``flylora-gateway`` as a child process, with /metrics on its own port. Use as a context manager."""

    def __init__(self, data_dir: Path, engine_url: str, *, base_model_dir: Path | None = None, **env: str):
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.log_path = data_dir / "gateway.log"
        self.env = clean_env(
            FLYLORA_DATA_DIR=str(data_dir), FLYLORA_ENGINE_URLS=engine_url, FLYLORA_ADMIN_KEY=GATEWAY_ADMIN_KEY,
            FLYLORA_GATEWAY_HOST="127.0.0.1", FLYLORA_GATEWAY_PORT=str(self.port),
            FLYLORA_METRICS_PORT=str(self.metrics_port), **env)
        if base_model_dir is not None:
            self.env["FLYLORA_BASE_MODEL_DIR"] = str(base_model_dir)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> GatewayProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the gateway did not start in 60 s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class CliResult:
    def __init__(self, done: subprocess.CompletedProcess):
        self.code = done.returncode
        self.out = done.stdout
        self.err = done.stderr

    def json(self) -> Any:
        return json.loads(self.out)

    def error(self) -> dict[str, Any]:
        """The JSON error a --json run printed on stderr."""
        return json.loads(self.err.strip().splitlines()[-1])

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-500:]!r}, err={self.err[-800:]!r})"


def flylora(*argv: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 120) -> CliResult:
    """Run ``python -m flylora_runtime.client ARGV`` (the ``flylora`` console script's module) as a process."""
    done = subprocess.run([sys.executable, "-m", "flylora_runtime.client", *argv], env=env if env is not None else clean_env(),
                          input=stdin, capture_output=True, text=True, timeout=timeout)
    return CliResult(done)
