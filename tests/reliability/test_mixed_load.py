"""A short soak (45 s; the 10-minute run is ``python -m loadtests.run soak``) on the real engine: completions,
streams, hang-ups, uploads, deletes and requests racing the deletes, from four tenants at once. Every request
is accounted for: each has an allowed outcome and the gateway counted exactly as many; no 5xx, no broken
connection."""

from __future__ import annotations

import json
import os

import pytest

from loadtests.soak import Target, run_soak
from tests.reliability.conftest import ADMIN_KEY, Stack, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_mixed_load_loses_nothing(stack: Stack):
    stack.ensure_engine()
    folders = [stack.adapter_folder(seed) for seed in (400, 401, 402, 403)]
    target = Target(url=stack.url, admin_key=ADMIN_KEY, gateway_pid=os.getpid(), engine_pid=stack.engine.process.pid,
                    adapter_folders=folders)
    summary = run(run_soak(target, 45, sample_s=5))
    summary.pop("samples")
    print("\nMIXED LOAD REPORT " + json.dumps({k: summary[k] for k in (
        "issued", "accounts", "unexpected", "gateway_counted_requests", "uploads", "deletes", "zero_lost")}))
    assert not summary["unexpected"], summary["unexpected"]
    assert summary["gateway_counted_requests"] == summary["issued"]
    assert summary["zero_lost"], summary
    for kind in ("completion", "stream", "cancel", "churn"):
        assert summary["accounts"][kind].get("ok", 0) + summary["accounts"][kind].get("hung_up", 0) > 0, kind
    assert summary["deletes"].get(204, 0) >= 3
    assert stack.engine.alive
