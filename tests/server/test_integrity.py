"""IntegrityChecker (server/integrity.py): each kind of damage gets its reason; unchanged files are not hashed
again; the verdict is cached for the check interval."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry

from flylora_runtime.format.checkpoint import sha256_file
from server import integrity
from server.integrity import CHECKSUM, CONFIG, MISSING, SIZE, IntegrityChecker
from server.registry import Adapter

from tests.server.helpers import adapter_files

ID = "fl-" + "0" * 32


@pytest.fixture
def setup(tmp_path):
    folder = tmp_path / ID
    config, weights = adapter_files(folder, r=4, top_k=2)
    adapter = Adapter(tenant_id=1, name="a", internal_id=ID, base_model="b", r=4, top_k=2, routing="signed",
                      bytes=weights.stat().st_size, sha256=sha256_file(weights), created=0)
    now = [0.0]
    registry = CollectorRegistry()
    checker = IntegrityChecker(tmp_path, registry, check_interval_s=1.0, clock=lambda: now[0])
    checker.metrics = registry  # for the test
    return checker, adapter, config, weights, now


def check(checker, adapter, force=True):
    return asyncio.run(checker.check(adapter, force=force))


def test_intact_then_each_kind_of_damage_then_restored(setup):
    checker, adapter, config, weights, _ = setup
    assert check(checker, adapter).ok
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[-3] ^= 1
    cases = [
        (lambda: weights.write_bytes(bytes(flipped)), CHECKSUM),
        (lambda: weights.write_bytes(original[:100]), SIZE),
        (lambda: weights.unlink(), MISSING),
    ]
    for damage, reason in cases:
        damage()
        verdict = check(checker, adapter)
        assert verdict.reason == reason, (reason, verdict)
        weights.write_bytes(original)
        assert check(checker, adapter).ok
    good = config.read_text()
    config.write_text(json.dumps({**json.loads(good), "r": 8}))
    assert check(checker, adapter).reason == CONFIG
    config.write_text("{not json")
    assert check(checker, adapter).reason == CONFIG
    config.write_text(good)
    assert check(checker, adapter).ok


def test_unchanged_files_are_not_hashed_again_and_verdicts_are_cached(setup, monkeypatch):
    checker, adapter, _, weights, now = setup
    calls = []
    real = integrity.verify
    monkeypatch.setattr(integrity, "verify", lambda *a: calls.append(1) or real(*a))
    assert check(checker, adapter, force=False).ok
    assert len(calls) == 1
    now[0] += 5
    assert check(checker, adapter, force=False).ok  # stat again: same inode, size, mtime: no hash
    assert len(calls) == 1
    weights.write_bytes(weights.read_bytes()[:50])
    assert check(checker, adapter, force=False).ok  # within the interval: the cached verdict
    now[0] += 5
    assert check(checker, adapter, force=False).reason == SIZE
    assert len(calls) == 2


def test_an_adapter_the_gateway_just_stored_is_not_hashed_at_its_first_request(setup, monkeypatch):
    """The upload hashed it (vouch): its first request only stats it, and a change after that is still found."""
    checker, adapter, _, weights, now = setup
    calls = []
    real = integrity.verify
    monkeypatch.setattr(integrity, "verify", lambda *a: calls.append(1) or real(*a))
    asyncio.run(checker.vouch(adapter))
    assert check(checker, adapter, force=False).ok and calls == []
    now[0] += 5
    assert check(checker, adapter, force=False).ok and calls == []  # stat: the same files
    weights.write_bytes(weights.read_bytes()[:50])
    now[0] += 5
    assert check(checker, adapter, force=False).reason == SIZE and calls == [1]


def test_failures_are_counted_once_when_confirmed(setup):
    checker, adapter, _, weights, _ = setup
    def value(name, **labels):
        return checker.metrics.get_sample_value(name, labels)

    weights.unlink()
    verdict = check(checker, adapter)
    # Not counted before it is confirmed (a missing folder may be an adapter being deleted).
    assert value("flylora_gateway_adapter_integrity_failures_total", reason=MISSING) == 0
    assert value("flylora_gateway_adapters_unavailable") == 0
    checker.confirm(adapter, verdict)
    checker.confirm(adapter, check(checker, adapter))  # the same failure seen again: not counted again
    assert value("flylora_gateway_adapter_integrity_failures_total", reason=MISSING) == 1
    assert value("flylora_gateway_adapters_unavailable") == 1
    checker.forget(ID)
    assert value("flylora_gateway_adapters_unavailable") == 0
