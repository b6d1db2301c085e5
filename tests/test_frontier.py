"""The Pareto frontier on hand-made cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.pareto import frontier, objectives_of, pareto_mask
from analysis.runs import AnalysisError


def trials(*rows, **extra) -> pd.DataFrame:
    """Rows of (name, score, gpu_hours) or (name, score, gpu_hours, status)."""
    records = []
    for row in rows:
        name, score, hours, *status = row
        records.append({"run_id": name, "status": status[0] if status else "FINISHED", "score": score,
                        "gpu_hours": hours, **{k: v[len(records)] for k, v in extra.items()}})
    return pd.DataFrame(records)


def names_on(front) -> list[str]:
    return list(front.frontier["run_id"])


def test_textbook_case():
    df = trials(("a", 40, 1.0), ("b", 50, 2.0), ("c", 45, 3.0), ("d", 60, 4.0), ("e", 30, 0.5))
    front = frontier(df)
    assert names_on(front) == ["e", "a", "b", "d"]  # cheapest first; c is beaten by b
    assert front.excluded == {}


def test_ties_on_one_objective_keep_only_the_better():
    df = trials(("cheap_low", 40, 1.0), ("cheap_high", 50, 1.0), ("dear_high", 50, 2.0))
    assert names_on(frontier(df)) == ["cheap_high"]  # same cost: lower score loses; same score: dearer loses


def test_exact_duplicates_are_all_kept():
    df = trials(("a", 50, 1.0), ("a_again", 50, 1.0), ("worse", 40, 1.5))
    front = frontier(df)
    assert sorted(names_on(front)) == ["a", "a_again"]


def test_a_single_trial_is_the_frontier():
    assert names_on(frontier(trials(("only", 10, 3.0)))) == ["only"]


def test_all_trials_equal_are_all_on_the_frontier():
    df = trials(*[(f"t{i}", 50, 1.0) for i in range(4)])
    assert frontier(df).trials["on_frontier"].all()


def test_missing_metrics_and_unfinished_trials_are_left_out_and_counted():
    df = trials(("ok", 50, 1.0), ("no_score", np.nan, 0.1), ("no_cost", 99, np.nan),
                ("failed", 90, 0.1, "FAILED"), ("running", 95, 0.05, "RUNNING"), ("killed", 99, 0.01, "KILLED"),
                ("ok_cheap", 40, 0.5))
    front = frontier(df)
    assert names_on(front) == ["ok_cheap", "ok"]
    assert front.excluded == {"missing score": 1, "missing gpu_hours": 1, "failed": 1, "running": 1, "killed": 1}
    reasons = dict(zip(front.trials["run_id"], front.trials["excluded"]))
    assert reasons["failed"] == "failed" and reasons["ok"] == ""
    assert not front.trials.loc[front.trials["excluded"] != "", "on_frontier"].any()
    assert front.summary().startswith("7 trials, 2 considered, 2 on the frontier")


def test_no_finished_trial_is_an_error_naming_why():
    with pytest.raises(AnalysisError, match="no finished trials.*2 failed"):
        frontier(trials(("a", 1, 1.0, "FAILED"), ("b", 2, 2.0, "FAILED")))
    with pytest.raises(AnalysisError, match="no trials"):
        frontier(trials())


def test_unknown_or_repeated_column_is_named():
    with pytest.raises(AnalysisError, match="'artifact_mb'"):
        frontier(trials(("a", 1, 1.0)), x="artifact_mb")
    with pytest.raises(AnalysisError, match="both 'score'"):
        frontier(trials(("a", 1, 1.0)), x="score")


def test_any_cost_column_and_direction_by_name():
    df = trials(("small", 50, 2.0), ("big", 60, 1.0), trainable_params=[1e3, 1e6])
    assert names_on(frontier(df, x="gpu_hours")) == ["big"]
    assert names_on(frontier(df, x="trainable_params")) == ["small", "big"]
    assert objectives_of(["score", "peak_mem_gb"]) == {"score": "max", "peak_mem_gb": "min"}


def test_multi_objective():
    # c is beaten on both costs by nobody: cheapest in params although dearest in hours.
    df = trials(("a", 50, 1.0), ("b", 60, 2.0), ("c", 50, 3.0), ("d", 50, 3.0), ("e", 45, 1.0),
                trainable_params=[100, 100, 10, 20, 100])
    front = frontier(df, objectives=["score", "gpu_hours", "trainable_params"])
    assert sorted(names_on(front)) == ["a", "b", "c"]  # d: c is as good everywhere and cheaper in params
    assert front.costs == ["gpu_hours", "trainable_params"]
    # Two costs alone (no score): the cheapest in each plus none that both beat.
    two = frontier(df, objectives={"gpu_hours": "min", "trainable_params": "min"})
    assert sorted(names_on(two)) == ["a", "c", "e"]


def test_pareto_mask_directly():
    costs = np.array([[1, 1], [1, 1], [2, 0], [2, 2], [0, 3]])
    assert pareto_mask(costs).tolist() == [True, True, True, False, True]
    assert pareto_mask(np.empty((0, 2))).tolist() == []


def test_bad_direction_is_refused():
    with pytest.raises(AnalysisError, match="'up'"):
        objectives_of({"score": "up"})


def test_trials_stopped_early_are_left_out_unless_included():
    # "stopped" (a scheduler stopped it at step 4) looks best and cheapest: its cost and score are those of an
    # unfinished run, so by default it is left out and counted, whatever status its run ended with
    df = trials(("stopped", 60, 0.5, "KILLED"), ("a", 50, 1.0), ("b", 55, 2.0), ("tagged", 70, 0.1),
                stopped_early=[4, None, None, 7])
    front = frontier(df)
    assert names_on(front) == ["a", "b"] and front.excluded == {"stopped early": 2}
    assert front.summary().endswith("left out: 2 stopped early")
    included = frontier(df, include_stopped=True)
    assert names_on(included) == ["tagged"] and included.excluded == {}
    # included, a stopped trial still needs every objective
    no_score = trials(("stopped", np.nan, 0.5, "KILLED"), ("a", 50, 1.0), stopped_early=[4, None])
    assert frontier(no_score, include_stopped=True).excluded == {"missing score": 1}
    with pytest.raises(AnalysisError, match="no finished trials"):
        frontier(trials(("stopped", 60, 0.5, "KILLED"), stopped_early=[4]))
    assert names_on(frontier(trials(("stopped", 60, 0.5, "KILLED"), stopped_early=[4]), include_stopped=True)) \
        == ["stopped"]
