"""The quality evaluation's statistics and its meta-sets (no engine: the run itself is `python -m
flylora_runtime.demo.quality`)."""

from __future__ import annotations

import json
import random

import pytest

from flylora_runtime.demo.quality import fit, loo_mae, r_squared, ranks, spearman, table
from flylora_runtime.demo.shifts import SHIFTS, meta_set, noisy
from flylora_runtime.demo.tasks import get_task


def test_ranks_average_ties_and_spearman_is_rank_correlation():
    assert ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]
    assert spearman([1, 2, 3, 4], [10, 100, 1000, 10000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert r_squared([1, 2, 3, 4], [10, 100, 1000, 10000]) < 0.9


def test_linear_fit_and_leave_one_out_error():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert fit(xs, [0.1 * x for x in xs]) == (pytest.approx(0.1), pytest.approx(0.0))
    assert loo_mae(xs, [0.1 * x for x in xs]) == pytest.approx(0.0, abs=1e-12)
    # one outlier: each estimate comes from the other four sets only
    ys = [0.1, 0.2, 0.9, 0.4, 0.5]
    slope, intercept = fit([1, 2, 4, 5], [0.1, 0.2, 0.4, 0.5])
    assert loo_mae(xs, ys) > abs(0.9 - (slope * 3 + intercept)) / 5


def test_meta_sets_are_ten_deterministic_sets_of_growing_shift():
    for task in ("shout", "json-reply", "atlas"):
        sets = meta_set(task, 30)
        assert [name for name, _ in sets] == list(SHIFTS) and all(len(p) == 30 for _, p in sets)
        assert meta_set(task, 30) == sets
        held = {e.prompt for e in get_task(task).heldout()}
        assert all(p.text in held for p in sets[0][1])  # in-domain: the held-out examples
        off = [sum(p.target is None for p in prompts) for _, prompts in sets]
        if task == "shout":  # every message has an upper-case answer
            assert off == [0] * 10
        else:
            assert off[:7] == [0] * 7 and off[7] < off[8] < off[9] == 30


def test_targets_stay_right_under_typos_and_extra_text():
    task = get_task("json-reply")
    for shift in ("typos (heavy)", "longer inputs", "distractors", "unseen entities"):
        prompts = dict(meta_set("json-reply", 20))[shift]
        for p in prompts:
            obj = json.loads(p.target)
            assert obj["name"] in p.text and obj["city"] in p.text and str(obj["age"]) in p.text
            assert task.scorer(p.target, p.target) and not task.scorer(p.target, "{}")
    for p in dict(meta_set("shout", 20))["typos (heavy)"]:
        assert p.target == ">> " + p.text.upper()


def test_noise_spares_protected_words_and_scales_with_rate():
    rng = random.Random(0)
    text = "Maria is 30 years old and lives in Lisbon, where the weather is usually mild."
    for _ in range(50):
        out = noisy(text, 0.3, rng, keep=("Maria", "Lisbon"))
        assert "Maria" in out and "Lisbon" in out and "30" in out
    light = sum(noisy(text, 0.02, random.Random(i)) != text for i in range(50))
    heavy = sum(noisy(text, 0.2, random.Random(i)) != text for i in range(50))
    assert light < heavy == 50


def test_table_has_every_adapter_signal_and_the_pooled_rows():
    rng = random.Random(1)
    sets = [{"adapter": t, "seed": 0, "level": lvl, "shift": s, "accuracy": 1 - lvl / 9 + rng.random() * 0.05,
             "mde": -3.4 - lvl * 0.01, "mean_energy": -20 + lvl, "mean_max_prob": 0.9 - lvl * 0.05,
             "mean_entropy": 0.3 + lvl * 0.1} for t in ("shout", "json-reply", "atlas")
            for lvl, s in enumerate(SHIFTS)]
    text, stats = table(sets)
    assert set(stats) == {"shout", "json-reply", "atlas", "pooled (3 adapters)"}
    assert stats["shout"]["MDE"]["spearman"] > 0.9 and stats["shout"]["mean energy"]["spearman"] < -0.9
    assert text.count("\n| pooled (3 adapters) |") == 4 and "| 9 off-task (0) |" in text
