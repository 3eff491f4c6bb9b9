"""Child processes: start one in its own process group, wait until it answers over HTTP, stop it, keep it up.

The one place the project starts its services as children: ``make serve`` (``server/stack.py``), the load
tests, the demo evaluation, the benchmarks and the tests all use it.

- :class:`ChildProcess`: any command, in its own session (so its whole process tree is one group), its output
  appended to a log file; ready when a URL answers 200; stopped with SIGTERM to the group, then SIGKILL to
  the group after a grace period, waiting until no member of the group is left.
- :class:`EngineProcess`: ``python -m flylora_runtime.engine`` for an ``EngineConfig``; ready on ``/health``.
- :class:`GatewayProcess`: ``python -m server.cli`` with ``FLYLORA_*`` settings; ready on ``/ready`` (an
  engine answers) or ``/health``.
- :class:`Supervisor`: restarts a child that exited, after a capped exponential backoff, and logs it.

Standard library only (psutil, for :meth:`ChildProcess.rss_bytes`, is imported when called), and it never
imports the engine launcher: the gateway side may import it without torch or vLLM (an import contract).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flylora_runtime.engine.auth import API_KEY_ENV

#: Loopback health probes never go through a proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def probe(url: str, timeout: float = 2.0) -> bool:
    """Whether ``GET url`` answers 200 within ``timeout`` seconds."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return False


def group_members(pgid: int) -> list[int] | None:
    """The pids in process group ``pgid`` that have not exited (zombies, which an init that does not reap
    orphans may keep around, are left out); ``None`` where there is no ``/proc`` to read."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


class ChildExited(RuntimeError):
    """A child process exited while something waited for it; the message ends with its log's last lines."""


def wait_http(url: str, *, timeout: float, what: str | None = None, children: Iterable[ChildProcess] = (),
              progress: Callable[[str], None] | None = None, interval: float = 0.5) -> float:
    """Poll ``url`` until it answers 200; returns the seconds waited.

    Raises :class:`ChildExited` as soon as one of ``children`` has exited, ``TimeoutError`` after ``timeout``
    seconds. ``progress`` (e.g. a logger) hears "still waiting" every 15 seconds.
    """
    what = what or url
    children = list(children)
    t0 = last = time.monotonic()
    while True:
        for child in children:
            if not child.alive():
                raise ChildExited(f"{child.name} exited with code {child.returncode} while waiting for {what}; "
                                  f"its log ({child.log_path}) ends:\n{child.log_tail()}")
        if probe(url, timeout=min(2.0, max(0.1, interval * 4))):
            return time.monotonic() - t0
        now = time.monotonic()
        if now - t0 > timeout:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s ({url})")
        if progress is not None and now - last >= 15:
            progress(f"still waiting for {what} ({now - t0:.0f} s) ...")
            last = now
        time.sleep(interval)


class ChildProcess:
    """A command run as a child in its own process group, its stdout and stderr appended to ``log_path``.

    ``start()`` spawns it and, when it has a ``ready_url``, waits until that answers 200 (stopping it and
    raising if it exits or times out first). Use as a context manager. ``start()`` again after it exited
    starts a new process with the same command (the log keeps growing).
    """

    def __init__(self, name: str, argv: list[str], *, log_path: str | os.PathLike, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, ready_url: str | None = None, ready_timeout: float = 300.0,
                 grace: float = 30.0):
        self.name, self.argv = name, list(argv)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ready_url = ready_url
        self.ready_timeout = ready_timeout
        self.grace = grace
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    # --- state ---------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """The leader's pid, which is also the process group's id."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    # --- start ---------------------------------------------------------------------------------------------
    def spawn(self) -> ChildProcess:
        """Start the process; do not wait for it."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.started_at = time.monotonic()
        return self

    def start(self) -> ChildProcess:
        """Spawn, then wait until ``ready_url`` answers (when there is one)."""
        self.spawn()
        if self.ready_url is not None:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None, *, children: Iterable[ChildProcess] = (),
                   progress: Callable[[str], None] | None = None) -> float:
        """Wait until ``ready_url`` answers 200 (seconds waited); stop the child and raise if it exits (or one
        of ``children`` does) or ``timeout`` (default ``ready_timeout``) passes first."""
        if self.ready_url is None:
            raise RuntimeError(f"{self.name} has no ready_url")
        try:
            return wait_http(self.ready_url, timeout=self.ready_timeout if timeout is None else timeout,
                             what=self.name, children=[self, *children], progress=progress)
        except TimeoutError as exc:
            self.stop()
            raise TimeoutError(f"{exc}; its log ({self.log_path}) ends:\n{self.log_tail()}") from None
        except ChildExited:
            self.stop()
            raise

    # --- look ----------------------------------------------------------------------------------------------
    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def rss_bytes(self) -> int:
        """Resident memory of the child's whole process tree (0 when it is not running)."""
        import psutil

        if not self.alive():
            return 0
        root = psutil.Process(self.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    # --- stop ----------------------------------------------------------------------------------------------
    def _signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the child's process group; False when no member is left."""
        try:
            os.killpg(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def _group_empty(self) -> bool:
        assert self.proc is not None
        self.proc.poll()  # reap the leader
        members = group_members(self.pid)
        return not self._signal_group(0) if members is None else not members

    def _wait_group(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._group_empty():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def kill(self) -> None:
        """SIGKILL the whole process group now (a crash, for fault tests) and reap the leader."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM to the group; SIGKILL to the group after ``grace`` seconds (default ``self.grace``) if any
        member is still there. Returns the leader's exit code (None: never started)."""
        if self.proc is None:
            return None
        grace = self.grace if grace is None else grace
        if not self._group_empty():
            self._signal_group(signal.SIGTERM)
            if not self._wait_group(grace):
                self._signal_group(signal.SIGKILL)
                self._wait_group(10)
        return self.proc.wait(timeout=10)

    def __enter__(self) -> ChildProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EngineProcess(ChildProcess):
    """A ``flylora-engine`` child for an ``EngineConfig`` (run as ``python -m flylora_runtime.engine``), ready
    when its ``/health`` answers. ``url``: ``http://host:port``."""

    def __init__(self, config: Any, log_path: str | os.PathLike, *, ready_timeout: float = 300.0,
                 env: Mapping[str, str] | None = None, grace: float = 30.0, name: str = "engine"):
        self.config = config
        self.url = f"http://{config.host}:{config.port}"
        env = dict(os.environ if env is None else env)
        env.pop(API_KEY_ENV, None)  # the engine's key is the config's, never one inherited by accident
        if getattr(config, "api_key", None):
            env[API_KEY_ENV] = config.api_key
        super().__init__(name, [sys.executable, "-m", "flylora_runtime.engine", *config.argv()], log_path=log_path,
                         env=env, ready_url=self.url + "/health", ready_timeout=ready_timeout, grace=grace)

    def spawn(self) -> EngineProcess:
        self.config.validate()  # a bad setting raises ValueError here, not as an exit code in the log
        super().spawn()
        return self


def settings_env(settings: Mapping[str, object], *, inherit: bool = True) -> dict[str, str]:
    """The environment for a gateway child: ``{"engine_urls": [...]}`` becomes ``FLYLORA_ENGINE_URLS=a,b``.

    With ``inherit=False`` no ``FLYLORA_*`` variable of this process (nor ``FLYLORA_ENV_FILE``) reaches it,
    so only ``settings`` (and the defaults) apply.
    """
    env = {k: v for k, v in os.environ.items() if inherit or not k.startswith("FLYLORA_")}
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        env["FLYLORA_" + key.upper()] = str(value)
    return env


class GatewayProcess(ChildProcess):
    """The gateway (``python -m server.cli``) as a child on ``host:port``; ``settings`` are its ``FLYLORA_*``
    settings by field name (see :func:`settings_env`). Ready when ``ready_path`` answers 200: ``/ready``
    (an engine answers too) or ``/health`` (the gateway alone). ``url``: ``http://host:port``."""

    def __init__(self, log_path: str | os.PathLike, *, port: int, host: str = "127.0.0.1",
                 settings: Mapping[str, object] | None = None, inherit_settings: bool = True,
                 log_level: str = "warning", ready_path: str = "/ready", ready_timeout: float = 300.0,
                 grace: float = 30.0, name: str = "gateway"):
        self.url = f"http://{host}:{port}"
        env = settings_env({**(settings or {}), "gateway_host": host, "gateway_port": port}, inherit=inherit_settings)
        super().__init__(name, [sys.executable, "-m", "server.cli", "--log-level", log_level], log_path=log_path,
                         env=env, ready_url=self.url + ready_path, ready_timeout=ready_timeout, grace=grace)


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``initial * factor**(n - 1)`` seconds before the n-th restart in a row, at most ``cap``.
    A child that stayed up ``reset_after`` seconds counts as healthy: its next restart waits ``initial``."""

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 30.0
    reset_after: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.cap, self.initial * self.factor ** max(0, failures - 1))


class Supervisor:
    """Keeps a child running: call :meth:`poll` every second or so (it never blocks for long).

    When the child has exited it logs the exit code and the log's last lines, waits the backoff delay,
    starts it again, and logs when its ``ready_url`` answers again (the seconds since it was found dead).
    ``downtimes`` holds those seconds, one per recovery; ``restarts`` counts the restarts.
    """

    def __init__(self, child: ChildProcess, *, backoff: Backoff = Backoff(), log: Callable[[str], None] = print,
                 tail_lines: int = 15):
        self.child, self.backoff, self.log, self.tail_lines = child, backoff, log, tail_lines
        self.restarts = 0
        self.failures = 0  # restarts in a row without a healthy stretch
        self.downtimes: list[float] = []
        self._dead_at: float | None = None
        self._restart_at: float | None = None

    @property
    def down(self) -> bool:
        """The child died and is not serving again yet."""
        return self._dead_at is not None

    def poll(self) -> None:
        now = time.monotonic()
        child = self.child
        if child.alive():
            if self._dead_at is not None and self._restart_at is None and (
                    child.ready_url is None or probe(child.ready_url, timeout=1.0)):
                self.downtimes.append(now - self._dead_at)
                self.log(f"{child.name} is serving again, {now - self._dead_at:.1f} s after it died "
                         f"(restart {self.restarts})")
                self._dead_at = None
            return
        if self._restart_at is None:  # found dead (or a restart failed to start)
            uptime = now - child.started_at
            self.failures = 1 if uptime >= self.backoff.reset_after else self.failures + 1
            delay = self.backoff.delay(self.failures)
            if self._dead_at is None:
                self._dead_at = now
            self.log(f"{child.name} exited with code {child.returncode} after {uptime:.0f} s; restarting it in "
                     f"{delay:.3g} s (restart {self.restarts + 1}). Its log ({child.log_path}) ends:\n"
                     f"{child.log_tail(self.tail_lines)}")
            child.stop(grace=5)  # leftovers of its group (an orphaned worker) go too
            self._restart_at = now + delay
        elif now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            try:
                child.spawn()
            except OSError as exc:
                self.failures += 1
                self._restart_at = now + self.backoff.delay(self.failures)
                self.log(f"restarting {child.name} failed ({exc}); next try in "
                         f"{self._restart_at - now:.3g} s")
                return
            self.log(f"{child.name} restarted (pid {child.pid})")
