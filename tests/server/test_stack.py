"""``make serve``'s launcher (server/stack.py) without an engine: its printed examples, and its supervision loop
with small HTTP servers standing in for the engine and the gateway children (the real engine's kill -9 is
tests/deploy/test_serve_restarts_engine.py)."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from flylora_runtime.engine.process import Backoff, ChildProcess, free_port, probe
from server import stack

from tests.runtime.test_process import SERVER

BASE = "SmolLM2-135M-Instruct"


def test_printed_examples_are_valid_for_an_adapter_and_for_the_base_model():
    for model in ("shout", BASE):
        text = stack.examples("http://127.0.0.1:8000", "flk-key", model, BASE)
        body = json.loads(text.split("-d '")[1].split("'\n")[0])
        assert body["model"] == model and body["messages"][0]["content"]
        code = text.split("<<'EOF'\n")[1].split("\nEOF")[0]
        compile(code, "example", "exec")
        loop = next(line for line in code.splitlines() if line.startswith("for model in"))
        assert eval(loop.removeprefix("for model in ").rstrip(":")) == tuple(dict.fromkeys((BASE, model)))
    assert "export FLYLORA_KEY=flk-key" in text


def toy(tmp_path, name: str) -> ChildProcess:
    port = free_port()
    return ChildProcess(name, [sys.executable, "-c", SERVER, str(port), "-"], log_path=tmp_path / f"{name}.log",
                        ready_url=f"http://127.0.0.1:{port}/health", grace=5)


def test_serve_restarts_a_dead_engine_and_ends_when_the_gateway_dies(tmp_path, capsys):
    engine, gateway = toy(tmp_path, "engine").start(), toy(tmp_path, "gateway").start()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(stack.serve(engine, gateway, Backoff(initial=0.2))))
    thread.start()
    try:
        first = engine.pid
        engine.kill()
        deadline = time.monotonic() + 30
        while not (engine.alive() and engine.pid != first and probe(engine.ready_url)):
            assert time.monotonic() < deadline, capsys.readouterr().err
            time.sleep(0.1)
        gateway_pid = gateway.pid
        gateway.kill()
        thread.join(timeout=30)
        assert result == [1]
        assert gateway.pid == gateway_pid  # the gateway is not restarted: its death ends the run
    finally:
        gateway.stop()
        engine.stop()
        thread.join(timeout=30)
    err = capsys.readouterr().err
    assert "[serve] engine exited with code -9" in err and "[serve] engine restarted (pid" in err
    assert "[serve] gateway exited with code -9" in err


def test_sigterm_stops_once_and_ignores_a_second_during_the_shutdown():
    """The first SIGTERM stops the stack as Ctrl-C does (KeyboardInterrupt); a second one arriving while the
    children stop (make passing the signal on to a group that got it already) is ignored instead of cutting the
    cleanup short."""
    import os
    import signal

    previous = signal.signal(signal.SIGTERM, stack._sigterm)
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: no exception, the process lives on
    finally:
        signal.signal(signal.SIGTERM, previous)
