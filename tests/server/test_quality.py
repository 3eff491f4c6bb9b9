"""Quality figures (MDE, KS drift, the linear calibration) and their windows in a real SQLite registry."""

from __future__ import annotations

import math
import random

import pytest
from sqlalchemy import func, select

from server.quality import Calibration, Sample, fit_line, ks_p_value, ks_statistic, mde, summarize
from server.quality_store import Observation, QualityStore, SampleRow, base_subject
from server.registry import Registry


def test_mde_is_mean_log_softmax_of_the_energies():
    energies = [-20.0, -22.5, -19.0, -30.0]
    top = max(energies)
    log_softmax = [e - top - math.log(sum(math.exp(x - top) for x in energies)) for e in energies]
    assert mde(energies) == pytest.approx(sum(log_softmax) / len(log_softmax), abs=1e-12)
    # equal energies give -log N: MDE depends on the number of samples
    assert mde([-5.0] * 100) == pytest.approx(-math.log(100))
    # and not on their level (log_softmax is shift invariant)
    assert mde([e + 7 for e in energies]) == pytest.approx(mde(energies))


def test_ks_statistic_by_hand_and_with_ties():
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([1, 2, 3], [4, 5, 6]) == 1.0
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)
    assert ks_statistic([1, 1, 2], [1, 2, 2]) == pytest.approx(1 / 3)  # ties stepped over together


def test_ks_p_value_is_kolmogorovs_tail_and_separates_same_from_shifted():
    lam = (math.sqrt(50) + 0.12 + 0.11 / math.sqrt(50)) * 0.3
    expected = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 50))
    assert ks_p_value(0.3, 100, 100) == pytest.approx(expected) and expected < 1e-3
    assert ks_p_value(0.0, 100, 100) == 1.0 and ks_p_value(0.05, 100, 100) > 0.99
    rng = random.Random(0)
    same = [ks_statistic([rng.gauss(0, 1) for _ in range(100)], [rng.gauss(0, 1) for _ in range(100)])
            for _ in range(200)]
    assert sum(d > 0.3 for d in same) == 0  # the alert threshold: no false alarm in 200 draws of no change
    shifted = [ks_statistic([rng.gauss(0, 1) for _ in range(100)], [rng.gauss(1, 1) for _ in range(100)])
               for _ in range(50)]
    assert min(shifted) > 0.3  # a one-sigma shift always alarms


def test_fit_line_and_calibrated_estimate():
    xs = [-4.9, -4.8, -4.7, -4.6]
    a, b, r2 = fit_line(xs, [0.2 + 2 * (x + 4.9) for x in xs])
    assert (a, b, r2) == (pytest.approx(2.0), pytest.approx(0.2 + 2 * 4.9), pytest.approx(1.0))
    cal = Calibration(slope=a, intercept=b, r2=r2, points=4, window_size=4, fitted=0)
    assert cal.estimate(-4.75) == pytest.approx(0.5) and cal.estimate(0.0) == 1.0 and cal.estimate(-9) == 0.0
    with pytest.raises(ValueError):
        fit_line([1.0, 1.0], [0.0, 1.0])


def _samples(energies):
    return [Sample(energy=e, max_prob=0.5, entropy=1.0, tokens=10) for e in energies]


def test_summary_reports_mde_drift_and_estimate_only_for_a_full_window():
    cal = Calibration(slope=1.0, intercept=5.0, r2=0.9, points=3, window_size=4, fitted=0)
    partial = summarize(_samples([-1, -2]), 4, observed=2, reference=None, reference_source=None, calibration=cal)
    assert partial["window"] == {"size": 4, "fill": 2, "observed": 2}
    assert partial["mean_energy"] == -1.5 and partial["mde"] is None and partial["estimated_accuracy"] is None
    full = summarize(_samples([-1, -2, -3, -4, -5]), 4, observed=5, reference=[-1.0, -2.0, -3.0, -4.0],
                     reference_source="first", calibration=cal)
    assert full["window"]["fill"] == 4 and full["mean_energy"] == -3.5  # the newest 4
    assert full["mde"] == pytest.approx(mde([-2, -3, -4, -5]))
    assert full["drift"]["ks"] == pytest.approx(0.25) and full["drift"]["energy_shift"] < 0
    assert full["estimated_accuracy"] == pytest.approx(min(1.0, max(0.0, full["mde"] + 5.0)))
    # a calibration fitted for another window size is not applied
    other = Calibration(slope=1.0, intercept=5.0, r2=0.9, points=3, window_size=8, fitted=0)
    assert summarize(_samples([-1, -2, -3, -4]), 4, observed=4, reference=None, reference_source=None,
                     calibration=other)["estimated_accuracy"] is None


def _obs(subject, energy, tenant_id=1):
    return Observation(subject, tenant_id, "acme", "support", Sample(energy, 0.5, 1.0, 12))


@pytest.fixture
def registry(tmp_path):
    reg = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    yield reg
    reg.close()


def test_windows_keep_the_newest_n_and_the_first_n_as_reference(registry):
    store = QualityStore(registry.db, window_size=4)
    for batch in ([-1.0, -2.0], [-3.0], [-4.0, -5.0, -6.0], [-7.0] * 5):
        store.append([_obs("fl-a", e) for e in batch])
    assert store.window_energies("fl-a") == [-7.0] * 4
    got = store.summary("fl-a")
    assert got["window"] == {"size": 4, "fill": 4, "observed": 11}
    assert got["reference"]["source"] == "first" and got["reference"]["mean_energy"] == -2.5
    assert got["drift"]["ks"] == 1.0
    with store._session() as s:  # pruned back to N once past 2N
        assert s.scalar(select(func.count()).select_from(SampleRow)) <= 8
    store.pin_reference("fl-a", store.window_energies("fl-a"))
    pinned = store.summary("fl-a")
    assert pinned["reference"]["source"] == "pinned" and pinned["drift"]["ks"] == 0.0
    assert store.summary("fl-none")["window"] == {"size": 4, "fill": 0, "observed": 0}


def test_two_gateway_replicas_share_one_window(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    one, two = Registry.open(url), Registry.open(url)
    try:
        a, b = QualityStore(one.db, 4), QualityStore(two.db, 4)
        a.append([_obs("fl-x", -1.0), _obs(base_subject(7), -3.0, tenant_id=7)])
        b.append([_obs("fl-x", -2.0)])
        a.append([_obs("fl-x", -3.0)])
        b.append([_obs("fl-x", -4.0)])
        assert a.summary("fl-x") == b.summary("fl-x")
        assert a.summary("fl-x")["window"]["fill"] == 4 and a.summary("fl-x")["reference"]["source"] == "first"
        assert {s.subject for s in b.summaries()} == {"fl-x", "base:7"}
        b.forget(["fl-x"])
        assert a.summary("fl-x")["window"]["observed"] == 0 and {s.subject for s in a.summaries()} == {"base:7"}
    finally:
        one.close()
        two.close()


def test_calibration_is_stored_per_subject(registry):
    store = QualityStore(registry.db, window_size=3)
    cal = Calibration(slope=0.5, intercept=3.0, r2=0.8, points=4, window_size=3, fitted=1)
    store.set_calibration("fl-c", 1, "acme", "support", cal)
    store.append([_obs("fl-c", e) for e in (-1.0, -1.5, -2.0)])
    got = store.summary("fl-c")
    assert got["calibration"]["slope"] == 0.5
    assert got["estimated_accuracy"] == pytest.approx(min(1.0, max(0.0, 0.5 * got["mde"] + 3.0)))


def test_window_size_below_two_is_refused(registry):
    with pytest.raises(ValueError):
        QualityStore(registry.db, window_size=1)
