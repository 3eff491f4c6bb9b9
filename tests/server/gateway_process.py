"""The real gateway as a child process (``python -m server.cli``), for tests that measure its memory, kill it
mid-operation, or must not share a GIL with the test's clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.server.helpers import ADMIN_KEY, free_port_url, write_base_model

BASE_ID = "SmolLM2-135M-Instruct"


class GatewayProcess:
    """``with GatewayProcess(data_dir, engine_urls, FLYLORA_X=...) as gw:``; the log is ``data_dir/gateway.log``."""

    def __init__(self, data_dir: Path, engine_urls: list[str] | None = None, base_config: dict | None = None,
                 log_level: str = "warning", **settings: Any):
        self.data_dir = data_dir
        self.log_level = log_level
        self.port = int(free_port_url().rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "gateway.log"
        write_base_model(data_dir / "models" / BASE_ID, *([base_config] if base_config else []))
        self.env = {**os.environ, "FLYLORA_DATA_DIR": str(data_dir), "FLYLORA_ADMIN_KEY": ADMIN_KEY,
                    "FLYLORA_BASE_MODEL_ID": BASE_ID, "FLYLORA_HEALTH_CHECK_INTERVAL_S": "0",
                    "FLYLORA_ENGINE_URLS": ",".join(engine_urls or [free_port_url()])}
        self.env.update({f"FLYLORA_{k.upper()}": str(v) for k, v in settings.items()})
        self.proc: subprocess.Popen | None = None

    def start(self) -> GatewayProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--port", str(self.port),
                                          "--log-level", self.log_level], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError("the gateway did not start")

    def status(self, field: str) -> int:
        """A memory figure of the process from /proc (``VmRSS``, ``VmHWM``: peak RSS), in bytes."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, key: str | None = ADMIN_KEY, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {key}"} if key else {},
                            timeout=timeout)

    def new_tenant(self, name: str) -> str:
        with self.client() as c:
            r = c.post("/admin/tenants", json={"name": name})
        assert r.status_code == 201, r.text
        return r.json()["api_key"]

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


UPLOAD_SCRIPT = """
import sys, httpx
url, key, name, config, weights = sys.argv[1:6]
with open(config, "rb") as c, open(weights, "rb") as w:
    r = httpx.post(url + "/v1/adapters", headers={"authorization": "Bearer " + key}, timeout=600,
                   data={"name": name}, files={"config": ("adapter_config.json", c),
                                               "weights": ("adapter_model.safetensors", w)})
print(r.status_code, r.text[:300].replace(chr(10), " "))
"""


def upload_in_subprocess(url: str, key: str, name: str, config: Path, weights: Path) -> subprocess.Popen:
    """An upload sent by another process (its client work does not share the test's GIL); stdout is
    ``<status> <body>``."""
    return subprocess.Popen([sys.executable, "-c", UPLOAD_SCRIPT, url, key, name, str(config), str(weights)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
