"""flylora_runtime.vllm_plugin.heap: the CPU worker's heap frozen after warm-up (a unit test of that one module;
the worker's warm-up is a test double, named as such)."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm")

from flylora_runtime.vllm_plugin.heap import freezing_after_warm_up  # noqa: E402


def test_the_heap_is_frozen_after_the_original_warm_up_returns() -> None:
    calls = []

    def warm_up_double(self):  # test double of CPUWorker.compile_or_warm_up_model
        calls.append((self, gc.get_freeze_count()))
        return "compilation times"

    worker = object()
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        assert freezing_after_warm_up(warm_up_double)(worker) == "compilation times"
        assert calls == [(worker, 0)]  # the original ran first, before anything was frozen
        assert gc.get_freeze_count() > 1000  # this process's objects: no longer scanned by collections
    finally:
        gc.unfreeze()
