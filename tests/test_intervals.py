"""The intervals every score carries, against values computed here from their textbook formulas."""

import math

import pytest

from tracking.intervals import difference, mean_interval, paired_difference, wilson

Z = 1.959963984540054  # the normal quantile of 0.975


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927): (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    p = k / n
    centre, half = p + Z**2 / (2 * n), Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n * n))
    return 100 * (centre - half) / (1 + Z**2 / n), 100 * (centre + half) / (1 + Z**2 / n)


@pytest.mark.parametrize("k,n", [(150, 300), (0, 10), (10, 10), (1, 3), (287, 300), (93, 400)])
def test_wilson_matches_its_formula(k, n):
    got = wilson(k, n)
    low, high = wilson_by_hand(k, n)
    assert got.value == pytest.approx(100 * k / n)
    assert (got.low, got.high) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
    assert got.n == n


def test_wilson_known_values_and_refusals():
    assert (round(wilson(150, 300).low, 2), round(wilson(150, 300).high, 2)) == (44.38, 55.62)
    assert round(wilson(0, 10).high, 2) == 27.75  # not zero-width at 0%, as the normal approximation would be
    with pytest.raises(ValueError, match="zero questions"):
        wilson(0, 0)
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_mean_over_seeds_is_students_t():
    got = mean_interval([50.0, 52.0, 54.0])
    # sd 2, sem 2/sqrt(3), t(0.975, 2) = 4.302652729911275
    half = 4.302652729911275 * 2 / math.sqrt(3)
    assert (got.value, got.low, got.high, got.n) == (52.0, pytest.approx(52 - half), pytest.approx(52 + half), 3)
    assert mean_interval([61.0]).low == mean_interval([61.0]).high == 61.0
    assert mean_interval([40.0, 40.0]).low == 40.0


def test_a_mean_over_seeds_stays_on_the_scores_scale():
    got = mean_interval([15.6, 34.4])  # two seeds far apart: t with 1 degree of freedom spans [-103.8, 153.8]
    assert (got.low, got.high) == (0.0, 100.0) and got.value == pytest.approx(25.0)


def test_a_mean_over_seeds_is_never_narrower_than_its_questions_noise():
    """Every seed answers the same questions: their noise is not in the spread over seeds."""
    questions = wilson(156, 300)  # 52%
    got = mean_interval([50.0, 52.0, 54.0], questions=300)
    assert (got.low, got.high) == (pytest.approx(questions.low), pytest.approx(questions.high))
    tied = mean_interval([60.0, 60.0, 60.0], questions=300)
    assert (tied.low, tied.high) == (pytest.approx(wilson(180, 300).low), pytest.approx(wilson(180, 300).high))
    spread = mean_interval([30.0, 52.0, 74.0], questions=300)  # the training's noise is the wider here
    assert (spread.low, spread.high) == (pytest.approx(mean_interval([30.0, 52.0, 74.0]).low),
                                         pytest.approx(mean_interval([30.0, 52.0, 74.0]).high))


def test_a_difference_is_welchs():
    a, b = [50.0, 52.0, 54.0], [40.0, 41.0, 45.0]
    got = difference(a, b)
    va, vb = 4.0 / 3, 7.0 / 3  # variances of the means
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)  # Welch-Satterthwaite
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(va + vb)
    assert got.value == pytest.approx(10.0)
    assert (got.low, got.high) == (pytest.approx(10 - half), pytest.approx(10 + half))
    assert got.excludes(0) and not got.within(-2, 2)
    with pytest.raises(ValueError, match="2 values"):
        difference([1.0], [2.0, 3.0])


def test_one_tied_side_is_the_other_sides_t_interval_without_a_warning():
    import warnings

    from scipy.stats import t

    tied = [160 / 3] * 2 + [53.33333333333333]  # three seeds' equal means, as floats come out of a division
    b = [40.0, 44.0, 47.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's "precision loss" warning on the tied side would fail here
        got = difference(tied, b)
    half = t.ppf(0.975, 2) * math.sqrt(sum((x - 131 / 3) ** 2 for x in b) / 2 / 3)
    assert (got.low, got.high) == (pytest.approx(160 / 3 - 131 / 3 - half), pytest.approx(160 / 3 - 131 / 3 + half))


def test_a_difference_without_spread_gets_newcombes_interval_over_the_questions():
    # Newcombe (1998), Table II, method 10: 56/70 against 48/80 -> 0.2 [0.0524, 0.3339]
    got = difference([80.0, 80.0], [60.0, 60.0], questions=(70, 80))
    assert got.value == pytest.approx(20.0)
    assert (round(got.low, 2), round(got.high, 2)) == (5.24, 33.39)
    tie = difference([60.0] * 3, [60.0] * 3, questions=(300, 300))
    assert tie.low < -7 and tie.high > 7, "equal seeds do not make a certain tie"


def test_a_paired_difference_is_students_t_over_the_pairs_differences():
    a, b = [50.0, 53.0, 55.0], [48.0, 50.0, 54.0]  # differences 2, 3, 1: mean 2, standard deviation 1
    from scipy.stats import t

    half = t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    got = paired_difference(a, b)
    assert (got.value, got.low, got.high, got.n) == (pytest.approx(2.0), pytest.approx(2 - half),
                                                    pytest.approx(2 + half), 3)
    assert got.high - got.low < difference(a, b).high - difference(a, b).low  # the seed's shared noise left out
    # every pair 10 apart: no spread to estimate the pairs' noise from, so the groups' interval (Welch's)
    assert paired_difference([50.0, 51.0, 52.0], [40.0, 41.0, 42.0]) == difference([50.0, 51.0, 52.0],
                                                                                   [40.0, 41.0, 42.0])
    for bad, match in [(([1.0], [2.0]), "2 pairs"), (([1.0, 2.0], [2.0]), "as many"),
                       (([1.0, math.nan], [2.0, 3.0]), "missing")]:
        with pytest.raises(ValueError, match=match):
            paired_difference(*bad)
