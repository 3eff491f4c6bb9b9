"""The engine's adapter counters cross processes: counted in one (vLLM's engine core), exported by another
(the API server's /metrics). No vLLM needed: the child process stands in for the engine core."""

from __future__ import annotations

import multiprocessing
import os

from prometheus_client import CollectorRegistry, generate_latest

from flylora_runtime.vllm_plugin import metrics


def _engine_core(loads: int, activations: int) -> None:
    for _ in range(loads):
        metrics.count(metrics.LOADS)
    for _ in range(activations):
        metrics.count(metrics.ACTIVATIONS)
    assert metrics.flush()  # the writer thread is a daemon: an engine core that exits at once would lose them


def _run_child(*args: int) -> None:
    child = multiprocessing.get_context("spawn").Process(target=_engine_core, args=args)
    child.start()
    child.join(60)
    assert child.exitcode == 0


def test_counts_from_other_processes_are_summed_at_scrape_time(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path))
    registry = CollectorRegistry()
    registry.register(metrics.EngineCountersCollector(metrics.metrics_dir()))
    assert registry.get_sample_value("flylora_adapter_loads_total") == 0  # declared before any load
    _run_child(3, 5)
    _run_child(1, 0)  # a second process (e.g. a restarted engine core sharing the folder) adds up
    assert registry.get_sample_value("flylora_adapter_loads_total") == 4
    assert registry.get_sample_value("flylora_adapter_activations_total") == 5
    text = generate_latest(registry).decode()
    assert "# TYPE flylora_adapter_loads_total counter" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in tmp_path.glob("counts-*.json"))


def test_unreadable_files_are_skipped(tmp_path):
    (tmp_path / "counts-1.json").write_text("{not json")
    (tmp_path / "counts-2.json").write_text('{"flylora_adapter_loads": 2, "flylora_adapter_activations": "x"}')
    counts = metrics.read_counts(str(tmp_path))
    assert counts[metrics.LOADS] == 2 and counts[metrics.ACTIVATIONS] == 0 and set(counts) == set(metrics.COUNTERS)


def test_the_first_process_creates_and_exports_the_folder(monkeypatch):
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, "")  # recorded, so the test leaves the environment as it was
    monkeypatch.delenv(metrics.METRICS_DIR_ENV)
    folder = metrics.metrics_dir()
    assert os.path.isdir(folder) and os.environ[metrics.METRICS_DIR_ENV] == folder  # children inherit it
    assert metrics.metrics_dir() == folder
    os.rmdir(folder)


def test_flylora_engine_gives_every_engine_its_own_folder(monkeypatch, tmp_path):
    from flylora_runtime.engine.launcher import EngineConfig, command

    monkeypatch.setenv(metrics.METRICS_DIR_ENV, "/elsewhere/by/accident")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _, env = command(EngineConfig(model=str(model), adapter_store=str(tmp_path / "store"), max_loras=4,
                                  max_cpu_loras=16))  # counts set: a model of "{}" cannot be sized
    assert metrics.METRICS_DIR_ENV not in env


def test_cache_hits_and_misses_are_one_labelled_counter(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path))
    registry = CollectorRegistry()
    registry.register(metrics.EngineCountersCollector(str(tmp_path)))
    metrics.count_many({metrics.CACHE_HITS: 5, metrics.CACHE_MISSES: 2})
    assert metrics.flush()
    assert registry.get_sample_value("flylora_adapter_requests_total", {"cache": "hit"}) == 5
    assert registry.get_sample_value("flylora_adapter_requests_total", {"cache": "miss"}) == 2
    assert generate_latest(registry).decode().count("# TYPE flylora_adapter_requests_total counter") == 1


def test_counting_never_waits_for_the_file_system(tmp_path, monkeypatch):
    """A count returns while the file is still being written (a slow disk stalls no engine step), and the
    file ends up with every count, however many were made while a write was in progress."""
    import threading

    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path))
    assert metrics.flush()  # nothing pending from other tests
    before = metrics._counts[metrics.LOADS]  # this process's, from earlier tests too
    release, writing = threading.Event(), threading.Event()
    real_write = metrics._write

    def slow_write(folder, snapshot):
        writing.set()
        assert release.wait(10)
        real_write(folder, snapshot)

    monkeypatch.setattr(metrics, "_write", slow_write)
    metrics.count(metrics.LOADS)
    assert writing.wait(10)  # the writer holds the first count and is stuck in the file system
    for _ in range(5):
        metrics.count(metrics.LOADS)  # returns at once
    assert not metrics.flush(timeout=0.05)
    release.set()
    assert metrics.flush()
    assert metrics.read_counts(str(tmp_path))[metrics.LOADS] == before + 6
