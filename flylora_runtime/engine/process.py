"""Start, wait for, and stop a ``flylora-engine`` as a child process (tests, demo, load tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from flylora_runtime.engine.launcher import EngineConfig, command, sized


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineProcess:
    """A running engine. Use as a context manager; the log goes to ``log_path``.

    Attributes:
        url: ``http://host:port``.
        pid: the API server's pid (leader of its own process group, with the engine core and worker).
    """

    def __init__(self, config: EngineConfig, log_path: str | os.PathLike, *, ready_timeout: float = 300.0):
        self.config = config
        self.log_path = Path(log_path)
        self.ready_timeout = ready_timeout
        self.url = f"http://{config.host}:{config.port}"
        self.proc: subprocess.Popen | None = None
        self.memory = None  # the MemoryPlan, once started

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("engine not started")
        return self.proc.pid

    def start(self) -> "EngineProcess":
        # Slot and cache counts left at 0 are sized from memory now, so that ``config`` says what runs.
        self.config, self.memory = sized(self.config)
        cmd, env = command(self.config)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        lines = self.memory.describe() if self.memory else []
        log.write("".join(f"[flylora-engine] {line}\n" for line in lines).encode())
        log.flush()
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with code {self.proc.returncode} while starting; "
                                   f"last log lines:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"engine not ready after {self.ready_timeout:.0f} s; last log lines:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def rss_bytes(self) -> int:
        """Resident memory of the engine's whole process tree (API server, engine core, worker)."""
        import psutil

        root = psutil.Process(self.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "EngineProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
