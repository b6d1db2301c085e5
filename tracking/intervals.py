"""95% intervals for the scores a study logs and the effects its analysis reports (scipy's, not ours).

- `wilson(hits, n)`: a score over `n` questions, as percent with its Wilson score interval
  (Wilson 1927; what `statsmodels.proportion_confint(method="wilson")` and scipy's
  `binomtest(...).proportion_ci(method="wilson")` give). Unlike the normal approximation it
  stays inside 0-100 and is not zero-width at 0 or 100 percent.
- `mean_interval(values)`: the mean of one configuration's scores over seeds with Student's t
  interval (n - 1 degrees of freedom); one value has no spread to estimate and gets none.
- `difference(a, b)`: mean(a) - mean(b) with Welch's t interval (unequal variances), the effect
  of one factor level over another in `analysis.report`.

A score over zero questions is not a number: `wilson` raises ValueError for n = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    value: float   # the estimate (percent points for scores)
    low: float
    high: float
    n: int         # questions (wilson) or samples (seeds, per group for a difference: the smaller)

    def excludes(self, x: float) -> bool:
        return not (self.low <= x <= self.high)

    def within(self, low: float, high: float) -> bool:
        return low <= self.low and self.high <= high

    def __str__(self) -> str:
        return f"{self.value:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def wilson(hits: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Percent correct over `n` questions with its Wilson score interval, e.g. wilson(150, 300) ->
    50.0 [44.4, 55.6]. Raises ValueError when n <= 0 or hits is outside 0..n."""
    from scipy.stats import binomtest

    if n <= 0:
        raise ValueError("a score over zero questions is not a number")
    if not 0 <= hits <= n:
        raise ValueError(f"{hits} hits out of {n} questions")
    ci = binomtest(int(hits), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(100.0 * hits / n, 100.0 * ci.low, 100.0 * ci.high, int(n))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of `values` (one configuration's score at several seeds) with Student's t interval; a single
    value gets the interval [value, value] (no spread to estimate: the caller shows its own interval)."""
    from scipy import stats

    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        raise ValueError("no values to average")
    mean = sum(xs) / len(xs)
    if max(xs) == min(xs):  # one value, or every value equal: no spread to estimate
        return Interval(mean, mean, mean, len(xs))
    low, high = stats.t.interval(confidence, len(xs) - 1, loc=mean, scale=stats.sem(xs))
    return Interval(mean, float(low), float(high), len(xs))


def difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """mean(a) - mean(b) with Welch's t interval. Needs two values on each side (a spread to estimate);
    raises ValueError otherwise."""
    from scipy import stats

    a = [float(v) for v in a if not math.isnan(float(v))]
    b = [float(v) for v in b if not math.isnan(float(v))]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"an interval of a difference needs 2 values on each side (have {len(a)} and {len(b)})")
    diff = sum(a) / len(a) - sum(b) / len(b)
    if max(a) == min(a) and max(b) == min(b):
        return Interval(diff, diff, diff, min(len(a), len(b)))
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return Interval(diff, float(ci.low), float(ci.high), min(len(a), len(b)))
