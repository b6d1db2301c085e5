"""95% intervals for the scores a study logs and the effects its analysis reports (scipy's, not ours).

- `wilson(hits, n)`: a score over `n` questions, as percent with its Wilson score interval
  (Wilson 1927; what `statsmodels.proportion_confint(method="wilson")` and scipy's
  `binomtest(...).proportion_ci(method="wilson")` give). Unlike the normal approximation it
  stays inside 0-100 and is not zero-width at 0 or 100 percent.
- `mean_interval(values, questions)`: the mean of one configuration's scores over seeds. Two noises
  are in it: the training's (data order, init: the spread over seeds, Student's t with n - 1
  degrees of freedom) and the questions' (every seed answers the same questions, so their
  sampling noise does not show in that spread: Wilson over the `questions`). Each end is the
  wider of the two intervals', so the interval is never narrower than either; without
  `questions` it is the t interval alone (one value, or equal values: zero width).
- `difference(a, b, questions)`: mean(a) - mean(b) with Welch's t interval (unequal variances),
  the effect of one factor level over another in `analysis.report`. Both groups answered the same
  questions, so the questions' noise is shared and mostly cancels in the difference; where neither
  group has any spread (every seed scored the same), Welch's interval would have zero width and
  the difference gets Newcombe's interval of two proportions over `questions` instead (Newcombe
  1998, method 10, from the two Wilson intervals).
- `paired_difference(a, b, questions)`: the same effect where each value of a has its twin in b, trained
  at the same seed (the same data order, the same initial adapter weights, the same dropout masks:
  common random numbers): the mean of the pairs' differences with Student's t interval over them
  (the paired t interval), which leaves out the noise the twins share and so is narrower wherever the
  seed moves both alike. Pairs that all differ by the same amount fall back to `difference`.

A score over zero questions is not a number: `wilson` raises ValueError for n = 0.
"""

from __future__ import annotations

import math
import warnings
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


def mean_interval(values: Sequence[float], questions: float | None = None,
                  confidence: float = CONFIDENCE) -> Interval:
    """Mean of `values` (one configuration's score at several seeds, percent) with the wider, at each end, of
    Student's t interval over the values and the Wilson interval of the mean over `questions` (the questions
    each seed answered; None: the t interval alone), kept within 0-100. E.g. [50, 52, 54] over 300 questions -> 52.0 [46.4,
    57.6] (Wilson; t alone: [47.0, 57.0]). Raises ValueError for no values."""
    from scipy import stats

    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        raise ValueError("no values to average")
    mean = sum(xs) / len(xs)
    low = high = mean
    if max(xs) > min(xs):  # a spread to estimate
        low, high = (float(x) for x in stats.t.interval(confidence, len(xs) - 1, loc=mean, scale=stats.sem(xs)))
    if questions:
        asked = _of(mean, questions, confidence)
        low, high = min(low, asked.low), max(high, asked.high)
    # a score is a percentage: t over two seeds can reach past either end (25.0 [-14.7, 64.7] in a smoke study)
    return Interval(mean, max(low, 0.0), min(high, 100.0), len(xs))


def _of(percent: float, questions: float, confidence: float) -> Interval:
    """Wilson's interval of a mean score (percent) over `questions` questions (hits rounded to a whole)."""
    n = max(1, round(questions))
    return wilson(min(n, max(0, round(percent * n / 100))), n, confidence)


def difference(a: Sequence[float], b: Sequence[float], questions: tuple[float, float] | None = None,
               confidence: float = CONFIDENCE) -> Interval:
    """mean(a) - mean(b) with Welch's t interval; where neither side has a spread (every value of a equal, and
    of b) and `questions` (the questions each side's scores are over) are given, Newcombe's interval of two
    proportions instead (else zero width). Needs two values on each side; raises ValueError otherwise."""
    from scipy import stats

    a = [float(v) for v in a if not math.isnan(float(v))]
    b = [float(v) for v in b if not math.isnan(float(v))]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"an interval of a difference needs 2 values on each side (have {len(a)} and {len(b)})")
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    diff = mean_a - mean_b
    if max(a) == min(a) and max(b) == min(b):
        if not questions:
            return Interval(diff, diff, diff, min(len(a), len(b)))
        wa, wb = _of(mean_a, questions[0], confidence), _of(mean_b, questions[1], confidence)
        pa, pb = wa.value, wb.value  # the means as the hits were rounded
        d = pa - pb
        return Interval(d, d - math.hypot(pa - wa.low, wb.high - pb), d + math.hypot(wa.high - pa, pb - wb.low),
                        min(len(a), len(b)))
    with warnings.catch_warnings():
        # one side's seeds tied (every value equal): scipy warns of "precision loss" in its variance, which is
        # exactly zero, and Welch's interval is then the other side's t interval, as it should be
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return Interval(diff, float(ci.low), float(ci.high), min(len(a), len(b)))


def paired_difference(a: Sequence[float], b: Sequence[float], questions: tuple[float, float] | None = None,
                      confidence: float = CONFIDENCE) -> Interval:
    """mean(a_i - b_i) over pairs (a_i, b_i) with the paired t interval (Student's t over the differences, n - 1
    degrees of freedom); e.g. a = [50, 53, 55], b = [48, 50, 54] -> +2.0 [-0.5, +4.5] where Welch's interval of the
    same values is [-4.4, +8.4]. Where every pair differs by the same amount, `difference(a, b, questions)` (no
    spread to estimate the pairs' noise from). Needs two pairs, a and b of one length; raises ValueError otherwise."""
    from scipy import stats

    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b):
        raise ValueError(f"pairs need as many values on each side (have {len(a)} and {len(b)})")
    if any(math.isnan(v) for v in a + b):
        raise ValueError("a pair with a missing value")
    if len(a) < 2:
        raise ValueError(f"a paired interval needs 2 pairs (have {len(a)})")
    diffs = [x - y for x, y in zip(a, b)]
    if math.isclose(max(diffs), min(diffs), abs_tol=1e-9):  # scores are 100 k / n: equal up to rounding
        return difference(a, b, questions, confidence)
    mean = sum(diffs) / len(diffs)
    low, high = stats.t.interval(confidence, len(diffs) - 1, loc=mean, scale=stats.sem(diffs))
    return Interval(mean, float(low), float(high), len(diffs))
