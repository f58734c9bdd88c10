"""How much a figure can be trusted: intervals and the paired test (the gate that decides on
them is ``gate``).

Every accuracy is a count of right answers out of ``n`` images, so it gets a Wilson 95 %
interval (well behaved at 0 %, 100 % and small ``n``, where the normal approximation is not).
Retention compares the *same* old-label images before and after the expansion; only the images
whose outcome changed carry information about the change:

* ``lost``   (b): right before, wrong after;
* ``gained`` (c): wrong before, right after.

The exact McNemar test is a binomial test of b against b + c. The retention interval comes from
a Bayesian bootstrap over the four paired outcomes (a Dirichlet posterior with a Jeffreys prior):
unlike the plain bootstrap it does not collapse to a single point when nothing changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
DRAWS = 20_000


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes / n``; None without any image."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: how surprising ``lost`` vs ``gained`` changes are if
    losing and gaining were equally likely."""
    n = lost + gained
    if n == 0:
        return 1.0
    k = min(lost, gained)
    # P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (n may be large)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top - n * math.log(2)) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2 * tail)


def f1_interval(tp: int, fp: int, fn: int, seed: int = 0) -> tuple[float, float] | None:
    """95 % interval of one label's F1 = 2 tp / (2 tp + fp + fn): a Bayesian bootstrap over the
    three counts (Dirichlet, Jeffreys prior), as for retention; it reaches 1 when nothing was
    wrong and 0 when nothing was right, as Wilson's does. None without any image of it."""
    if tp + fn <= 0:
        return None
    draws = np.random.default_rng(seed).dirichlet(np.array([tp, fp, fn], float) + 0.5, DRAWS)
    f1 = 2 * draws[:, 0] / (2 * draws[:, 0] + draws[:, 1] + draws[:, 2])
    low, high = np.quantile(f1, [0.025, 0.975])
    low, high = (0.0 if tp == 0 else float(low)), (1.0 if fp + fn == 0 else float(high))
    return round(low, 6), round(high, 6)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: each p-value made valid for testing all of them at once
    (the family-wise error rate), in the order given."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def tarone(p_values: list[float], smallest: list[float], alpha: float) -> tuple[int, list[float]]:
    """Tarone's (1990) multiple test for discrete tests: a hypothesis whose test cannot reach
    ``alpha / k`` whatever happens (its ``smallest`` achievable p-value is above it) cannot be
    rejected and is not counted. ``k`` is the least number with at most ``k`` hypotheses able
    to reach ``alpha / k``; each of those is tested at ``alpha / k`` (Bonferroni over them
    alone), which keeps the family-wise error at ``alpha``. With paired changes per label,
    most labels change too few images to count, so a collapsed one is caught at sizes where
    Bonferroni or Holm over every label never could. Returns ``(k, p-values times k)``, the
    adjusted p-values 1 where a hypothesis is not counted."""
    k = 1
    while sum(1 for s in smallest if s <= alpha / k) > k:
        k += 1
    adjusted = [
        min(1.0, p * k) if s <= alpha / k else 1.0 for p, s in zip(p_values, smallest, strict=True)
    ]
    return k, adjusted


@dataclass(frozen=True)
class Paired:
    """Outcomes of the same images before and after."""

    both_right: int
    lost: int  # right before, wrong after
    gained: int  # wrong before, right after
    both_wrong: int

    @property
    def n(self) -> int:
        return self.both_right + self.lost + self.gained + self.both_wrong

    @property
    def right_before(self) -> int:
        return self.both_right + self.lost

    @property
    def right_after(self) -> int:
        return self.both_right + self.gained

    @property
    def retention(self) -> float | None:
        """Accuracy after over accuracy before."""
        return self.right_after / self.right_before if self.right_before else None

    def retention_interval(self, seed: int = 0) -> tuple[float, float] | None:
        if not self.n or not self.right_before:
            return None
        cells = np.array([self.both_right, self.lost, self.gained, self.both_wrong], float)
        draws = np.random.default_rng(seed).dirichlet(cells + 0.5, size=DRAWS)
        before = draws[:, 0] + draws[:, 1]
        ratio = (draws[:, 0] + draws[:, 2]) / before
        low, high = np.quantile(ratio, [0.025, 0.975])
        return round(float(low), 6), round(float(high), 6)

    def difference_interval(self, seed: int = 0) -> tuple[float, float] | None:
        """95 % interval of accuracy after minus accuracy before (gained - lost over n), by
        the same Bayesian bootstrap over the four paired outcomes."""
        if not self.n:
            return None
        cells = np.array([self.both_right, self.lost, self.gained, self.both_wrong], float)
        draws = np.random.default_rng(seed).dirichlet(cells + 0.5, size=DRAWS)
        low, high = np.quantile(draws[:, 2] - draws[:, 1], [0.025, 0.975])
        return round(float(low), 6), round(float(high), 6)

    def as_dict(self) -> dict:
        return {
            "both_right": self.both_right,
            "lost": self.lost,
            "gained": self.gained,
            "both_wrong": self.both_wrong,
        }


def paired(right_before: list[bool], right_after: list[bool]) -> Paired:
    pairs = list(zip(right_before, right_after, strict=True))
    return Paired(
        both_right=sum(1 for b, a in pairs if b and a),
        lost=sum(1 for b, a in pairs if b and not a),
        gained=sum(1 for b, a in pairs if not b and a),
        both_wrong=sum(1 for b, a in pairs if not b and not a),
    )
