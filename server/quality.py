"""Unlabelled quality figures of an adapter's traffic, from per-request energies (pure functions).

Each finished request has one energy: the mean, over its generated tokens, of the free energy
``E = -logsumexp(logits)`` of the raw logits the engine sampled each token from (measured inside the engine,
:mod:`flylora_runtime.vllm_plugin.energy`). Each adapter (and each tenant's use of the base model) keeps a
rolling **window** of the last ``N`` such energies and a **reference** window of ``N`` (the first ``N`` after
upload, or a window the tenant pins). From them:

- ``mean_energy``: the window's mean.
- ``mde``: Meta-Distribution Energy (Peng et al., ICLR 2024): ``mean_i log_softmax(E)_i = mean(E) -
  logsumexp(E)`` over the window. It depends on the number of samples (equal energies give ``-log N``), so it
  is only reported for a full window, and a calibration holds for the window size it was fitted at.
- ``drift``: the two-sample Kolmogorov-Smirnov statistic ``D`` between the window's energies and the
  reference's (the largest gap between their empirical CDFs, in [0, 1]), with its asymptotic p-value and the
  signed shift of the mean in reference standard deviations. KS rather than a standardized mean difference:
  per-request energies are skewed and heavy-tailed (an off-task prompt can answer at length with a very
  different energy), KS is unchanged by any monotone rescaling of the energy, bounded, catches a change in
  spread as well as in level, and for fixed ``N`` has one null distribution whatever the adapter, so one
  alert threshold serves every adapter (``N = 100``: ``D > 0.3`` has p < 0.001 under no change).
- ``estimated_accuracy``: once calibrated, the paper's linear map ``accuracy = a * MDE + b`` fitted on
  (MDE, accuracy) pairs of labelled sets of ``N`` requests, clipped to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def mde(energies: Sequence[float]) -> float:
    """Meta-Distribution Energy of a set of per-sample energies: ``mean(E) - logsumexp(E)``."""
    return math.fsum(energies) / len(energies) - logsumexp(energies)


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov ``D = max |F_a(x) - F_b(x)|`` (ties handled exactly)."""
    xs, ys = sorted(a), sorted(b)
    n, m = len(xs), len(ys)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        v = min(xs[i], ys[j])
        while i < n and xs[i] == v:
            i += 1
        while j < m and ys[j] == v:
            j += 1
        d = max(d, abs(i / n - j / m))
    return d


def ks_p_value(d: float, n: int, m: int) -> float:
    """Asymptotic p-value of ``D`` for sample sizes ``n`` and ``m`` (Kolmogorov's distribution with
    Stephens' small-sample correction)."""
    if d <= 0:
        return 1.0
    ne = n * m / (n + m)
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    if lam < 0.3:
        return 1.0
    total = math.fsum(2 * (-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, total))


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def stdev(values: Sequence[float]) -> float:
    mu = mean(values)
    return math.sqrt(math.fsum((v - mu) ** 2 for v in values) / max(1, len(values) - 1))


@dataclass(frozen=True)
class Calibration:
    """``accuracy = slope * MDE + intercept``, fitted on ``points`` labelled sets of ``window_size``."""

    slope: float
    intercept: float
    r2: float
    points: int
    window_size: int
    fitted: int

    def estimate(self, mde_value: float) -> float:
        return min(1.0, max(0.0, self.slope * mde_value + self.intercept))

    def to_json(self) -> dict[str, Any]:
        return {"slope": self.slope, "intercept": self.intercept, "r2": self.r2, "points": self.points,
                "window_size": self.window_size, "fitted": self.fitted}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        return cls(**{k: data[k] for k in ("slope", "intercept", "r2", "points", "window_size", "fitted")})


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least squares ``y = a x + b``: (a, b, R^2). ``xs`` must not all be equal."""
    mx, my = mean(xs), mean(ys)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        raise ValueError("the MDE values are all equal; a line cannot be fitted")
    a = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    b = my - a * mx
    syy = math.fsum((y - my) ** 2 for y in ys)
    residual = math.fsum((y - (a * x + b)) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - residual / syy if syy > 0 else 1.0
    return a, b, r2


@dataclass(frozen=True)
class Sample:
    """One finished request: means over its generated tokens."""

    energy: float
    max_prob: float | None
    entropy: float | None
    tokens: int


def _mean_of(samples: Sequence[Sample], field: str) -> float | None:
    values = [getattr(s, field) for s in samples if getattr(s, field) is not None]
    return mean(values) if values else None


def summarize(window: Sequence[Sample], window_size: int, *, observed: int, reference: Sequence[float] | None,
              reference_source: str | None, calibration: Calibration | None) -> dict[str, Any]:
    """The quality figures of a window (the newest ``window_size`` samples, oldest first)."""
    window = list(window)[-window_size:]
    energies = [s.energy for s in window]
    full = len(window) == window_size
    out: dict[str, Any] = {
        "window": {"size": window_size, "fill": len(window), "observed": observed},
        "mean_energy": mean(energies) if energies else None,
        "mde": mde(energies) if full else None,
        "mean_max_prob": _mean_of(window, "max_prob"),
        "mean_entropy": _mean_of(window, "entropy"),
        "mean_tokens": mean([s.tokens for s in window]) if window else None,
        "reference": None,
        "drift": None,
        "calibration": calibration.to_json() if calibration else None,
        "estimated_accuracy": None,
    }
    if reference:
        out["reference"] = {"source": reference_source, "size": len(reference), "mean_energy": mean(reference),
                            "mde": mde(reference)}
        if full:
            d = ks_statistic(energies, reference)
            spread = stdev(reference)
            out["drift"] = {
                "ks": d, "p_value": ks_p_value(d, len(energies), len(reference)),
                "energy_shift": (mean(energies) - mean(reference)) / spread if spread > 0 else 0.0,
            }
    if full and calibration is not None and calibration.window_size == window_size:
        out["estimated_accuracy"] = calibration.estimate(out["mde"])
    return out
