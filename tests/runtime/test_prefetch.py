"""The worker's background adapter loads (flylora_runtime/vllm_plugin/prefetch.py), without an engine."""

from __future__ import annotations

import threading

import pytest

from flylora_runtime.vllm_plugin.prefetch import Prefetcher


def test_a_load_runs_in_the_background_and_is_taken_once() -> None:
    p = Prefetcher()
    gate, seen = threading.Event(), []

    def load():
        seen.append(threading.current_thread().name)
        gate.wait(5)
        return "model"

    assert p.submit(7, load, "fl-a") is True
    assert p.submit(7, load) is False  # already pending: not loaded twice
    assert p.status(7) == "loading"  # submit returned while the load runs
    gate.set()
    fut = p.take(7)
    assert fut.result(timeout=5) == "model"
    assert seen == [seen[0]] and seen[0].startswith("flylora-prefetch") and seen[0] != threading.current_thread().name
    assert p.take(7) is None and p.status(7) is None
    p.shutdown()


def test_status_reports_ready_and_failures_once() -> None:
    p = Prefetcher()
    p.submit(1, lambda: "ok")
    p.submit(2, lambda: (_ for _ in ()).throw(ValueError("LoRA rank 64 is greater than max_lora_rank 32")))
    states = {}
    for lora_id in (1, 2):
        states[lora_id] = "loading"
        while states[lora_id] == "loading":
            states[lora_id] = p.status(lora_id)
    assert states[1] == "ready" and p.status(1) == "ready"  # stays ready until the loop takes it
    assert states[2] == "error: ValueError: LoRA rank 64 is greater than max_lora_rank 32"
    assert p.status(2) is None and p.take(2) is None  # a failed load is dropped once reported
    p.shutdown()


def test_an_untaken_failure_raises_in_the_loop_not_silently() -> None:
    p = Prefetcher()
    p.submit(3, lambda: (_ for _ in ()).throw(OSError("store gone")))
    with pytest.raises(OSError, match="store gone"):
        p.take(3).result(timeout=5)
    p.shutdown()


def test_pending_loads_are_bounded_and_discarded() -> None:
    p = Prefetcher(max_pending=2)
    gate = threading.Event()
    for i in range(4):
        p.submit(i, lambda: gate.wait(5))
    assert p.take(0) is None and p.take(1) is None  # the oldest dropped
    p.discard(3)
    assert p.take(3) is None and p.status(3) is None
    gate.set()
    assert p.take(2).result(timeout=5) is True
    p.shutdown()
