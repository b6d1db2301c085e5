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


# --- noise: significantly dominated points, and configurations run at several seeds ---

def test_contenders_are_the_points_no_cheaper_interval_lies_wholly_above():
    # b beats a at the same cost with an interval wholly above a's; c is beaten by b on the means but the
    # intervals overlap; d is far below b for more money; g scores highest but costs more than h, so it
    # dominates nothing cheaper; f has no interval: it is judged by nobody and judges nobody.
    df = trials(("e", 30, 0.5), ("f", 20, 0.8), ("h", 35, 0.9), ("a", 50, 1.0), ("b", 60, 1.0), ("c", 58, 2.0),
                ("d", 40, 3.0), ("g", 90, 5.0),
                score_ci_low=[10, np.nan, 33, 45, 57, 52, 38, 88], score_ci_high=[50, np.nan, 37, 55, 63, 64, 42, 92])
    front = frontier(df)
    assert names_on(front) == ["e", "h", "b", "g"]
    contender = dict(zip(front.trials["run_id"], front.trials["contender"]))
    assert {k: v for k, v in contender.items() if not pd.isna(v)} == {
        "e": True, "h": True, "a": False, "b": True, "c": True, "d": False, "g": True}
    assert pd.isna(contender["f"])
    # without an interval there is nothing to judge by: no column
    assert "contender" not in frontier(df.drop(columns=["score_ci_low", "score_ci_high"])).trials


def seeded(**configs) -> pd.DataFrame:
    """Trials of configurations name=(lora_rank, gpu_hours per seed, scores per seed), seeds 0, 1, 2, ..."""
    rows = []
    for name, (rank, hours, scores) in configs.items():
        rows += [{"run_id": f"{name}{seed}", "run_name": f"1m r{rank} seed={seed}", "status": "FINISHED",
                  "method": "lora", "model_size": "1m", "lora_rank": rank, "seed": seed, "score": score,
                  "score_ci_low": score - 5.0, "score_ci_high": score + 5.0, "gpu_hours": hours[seed]}
                 for seed, score in enumerate(scores)]
    return pd.DataFrame(rows)


def test_configurations_run_at_several_seeds_take_part_as_their_means():
    from tracking.intervals import mean_interval

    # b's luckiest seed (75) tops every trial, but on average b (45) is below a (50) at the same cost
    df = seeded(a=(8, [1.0, 1.1, 0.9], [50, 49, 51]), b=(16, [1.0, 1.0, 1.0], [30, 30, 75]))
    df = pd.concat([df, trials(("failed", np.nan, 0.1, "FAILED"))], ignore_index=True)
    assert names_on(frontier(df, over_seeds=False)) == ["a2", "b2"]  # trial by trial: b's lucky seed is on it
    front = frontier(df)
    assert names_on(front) == ["a0,a1,a2"] and front.over_seeds
    a = front.trials.set_index("run_id").loc["a0,a1,a2"]
    expected = mean_interval([50, 49, 51])  # the t interval over seeds replaces one evaluation's interval
    assert (a["score"], a["score_ci_low"], a["score_ci_high"]) == pytest.approx((expected.value, expected.low,
                                                                                  expected.high))
    assert a["seeds"] == 3 and a["gpu_hours"] == pytest.approx(1.0) and a["run_name"] == "1m r8"
    assert front.excluded == {"failed": 1} and front.trials["excluded"].tolist().count("failed") == 1
    assert front.summary().startswith("7 trials, 6 considered as 2 configurations (means over 3 seeds), "
                                      "1 on the frontier")
    assert bool(front.trials.set_index("run_id").loc["b0,b1,b2", "contender"])  # b's wide interval overlaps a's


def test_a_stopped_seed_is_never_averaged_with_the_finished_ones():
    df = seeded(a=(8, [1.0, 1.0], [50, 52]))
    stopped = {**df.iloc[0].to_dict(), "run_id": "a_stopped", "seed": 2, "status": "KILLED", "score": 90.0,
               "gpu_hours": 0.2, "stopped_early": 4}
    df = pd.concat([df, pd.DataFrame([stopped])], ignore_index=True)
    front = frontier(df).trials.set_index("run_id")
    assert front["score"].to_dict() == {"a0,a1": 51.0, "a_stopped": 90.0}
    # the search told Optuna PRUNED for a: the mean of its two finished seeds would flatter it
    assert front.loc["a0,a1", "excluded"] == "incomplete seeds" and not front["on_frontier"].any()
    included = frontier(df, include_stopped=True).trials.set_index("run_id")
    assert included["seeds"].to_dict() == {"a0,a1": 2, "a_stopped": 1} and included["on_frontier"]["a_stopped"]
