"""What a load is made of, free of I/O: adapter popularity, prompts, and length distributions.

Everything draws from one ``random.Random`` so a seed reproduces a run's request sequence exactly.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

POPULARITIES = ("single", "uniform", "zipf")


class Popularity:
    """Picks which of ``n`` models a request goes to.

    ``single``: always index 0. ``uniform``: each index with probability 1/n. ``zipf``: index i (0-based
    rank) with probability proportional to ``1 / (i + 1) ** alpha`` (finite Zipf over n items).
    """

    def __init__(self, kind: str, n: int, alpha: float = 1.0):
        if kind not in POPULARITIES:
            raise ValueError(f"popularity must be one of {POPULARITIES}, got {kind!r}")
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        if kind == "zipf" and alpha < 0:
            raise ValueError(f"zipf alpha must be >= 0, got {alpha}")
        self.kind, self.n, self.alpha = kind, n, alpha
        if kind == "single":
            weights = [1.0] + [0.0] * (n - 1)
        elif kind == "uniform":
            weights = [1.0] * n
        else:
            weights = [1.0 / (i + 1) ** alpha for i in range(n)]
        total = sum(weights)
        self.probabilities = [w / total for w in weights]
        self._cdf = list(itertools.accumulate(self.probabilities))
        self._cdf[-1] = 1.0

    def sample(self, rng: random.Random) -> int:
        return bisect.bisect_left(self._cdf, rng.random())


@dataclass(frozen=True)
class Lengths:
    """A length distribution: uniform integers in ``[low, high]`` (``low == high``: fixed)."""

    low: int
    high: int

    def __post_init__(self):
        if not 0 < self.low <= self.high:
            raise ValueError(f"lengths need 0 < low <= high, got [{self.low}, {self.high}]")

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    @classmethod
    def parse(cls, text: str) -> Lengths:
        """``"32"`` (fixed) or ``"16-64"`` (uniform)."""
        low, _, high = text.partition("-")
        return cls(int(low), int(high or low))


# Common English words: SmolLM2's tokenizer maps each, with its leading space, to one token, so a prompt of
# n words is about n tokens plus the chat template's ~20.
_WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "it", "his", "an", "were", "are", "which", "this", "be", "or", "has", "had", "not", "but", "one", "new", "first", "also", "after", "who", "its", "they", "two", "their", "her", "she", "been", "other", "when", "time", "all", "during", "into", "city", "school", "would", "world", "can", "year", "over", "many", "where", "about", "most", "more", "some", "there", "later", "then", "up", "these", "out", "three", "may", "only", "state", "part", "well", "such", "both", "made", "under", "people", "since", "while", "being", "between", "so", "film", "team", "work", "known", "what", "could", "used", "before", "him", "them", "series", "through", "day", "war", "house", "until", "member", "found", "any", "each", "four", "best", "early", "high", "music", "water", "light", "river", "small", "great", "place", "name", "long", "open", "sea", "book", "road"]


def prompt(rng: random.Random, words: int) -> str:
    """A chat prompt of about ``words`` tokens (a request to continue a word list)."""
    body = " ".join(rng.choice(_WORDS) for _ in range(words))
    return f"Continue this text: {body}"
