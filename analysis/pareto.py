"""The Pareto frontier of a study: the trials no other trial beats.

    from analysis.pareto import frontier
    front = frontier(trials, y="score", x="gpu_hours")            # score up, cost down
    front = frontier(trials, objectives=["score", "gpu_hours", "trainable_params"])
    front = frontier(trials, include_stopped=True)                 # early-stopped trials take part too
    front.trials        # every trial, with `on_frontier` and `excluded` (why it was left out)
    front.frontier      # the frontier's trials, cheapest first
    front.excluded      # {"failed": 2, "stopped early": 3, "missing gpu_hours": 1, ...}

Definition. Trial A dominates trial B when A is at least as good as B on every
objective and strictly better on at least one. The frontier is exactly the set of
trials that no other trial dominates. What follows from it, on purpose:
- Ties on one objective: of two trials with the same cost, the lower-scoring one is
  dominated; of two with the same score, the costlier one is.
- Exact duplicates (equal on every objective, e.g. NSGA-II repeating a configuration,
  or the same config run twice): neither dominates the other, so all copies stay on
  the frontier. Nothing is dropped silently; `frontier` lists each of them.
- A single trial, or trials all equal, are all on the frontier.
Only trials whose MLflow status is FINISHED and that have every objective (a number,
not NaN) take part. The others keep their row with `on_frontier` False and the reason
in `excluded` ("failed", "killed", "running", "stopped early", "missing gpu_hours"),
counted in `Frontier.excluded`: a failed, still-running or early-stopped trial has a
partial cost and would otherwise sit on the frontier looking cheap. A trial that an
early-stopping scheduler stopped (its run is KILLED with a `stopped_early` tag, the
`stopped_early` column of analysis.runs) takes part only with `include_stopped=True`,
with the metrics it logged before it was stopped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from analysis.runs import STOPPED_TAG, AnalysisError
from tracking import metrics
from trainables.config import TrialConfig

# The tables' aggregates of a score, maximised like the score (tracking.metrics has the metrics' directions).
AGGREGATES_MAXIMIZED = {"score_best", "score_mean"}


def direction(column: str) -> str:
    """'max' where higher is better (tracking.metrics' table), else 'min': every cost, and any other column."""
    return "max" if column in AGGREGATES_MAXIMIZED else metrics.direction(column)


def objectives_of(objectives: Iterable[str] | Mapping[str, str]) -> dict[str, str]:
    """{"score": "max", "gpu_hours": "min"} from a list of columns (directions by name) or a mapping."""
    if isinstance(objectives, Mapping):
        bad = {k: v for k, v in objectives.items() if v not in ("max", "min")}
        if bad:
            raise AnalysisError(f"objective direction must be 'max' or 'min', got {bad}")
        return dict(objectives)
    return {col: direction(col) for col in objectives}


def pareto_mask(costs: np.ndarray) -> np.ndarray:
    """True for the rows of `costs` (n x k, lower is better on every column) that no row dominates.

    O(n^2 k) time but O(n k) memory: a study has hundreds of trials, not millions.
    """
    costs = np.asarray(costs, dtype=float)
    on = np.ones(len(costs), dtype=bool)
    for i, row in enumerate(costs):
        weakly_better = (costs <= row).all(axis=1)
        strictly_somewhere = (costs < row).any(axis=1)
        on[i] = not (weakly_better & strictly_somewhere).any()  # an exact duplicate is neither
    return on


@dataclass
class Frontier:
    trials: pd.DataFrame  # every trial: `on_frontier` (bool) and `excluded` ("" when it took part)
    objectives: dict[str, str]
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def costs(self) -> list[str]:
        return [c for c, d in self.objectives.items() if d == "min"]

    @property
    def frontier(self) -> pd.DataFrame:
        """The frontier's trials, sorted by the first cost (cheapest first), then the first objective."""
        keys = self.costs[:1] + [c for c in self.objectives if c not in self.costs[:1]]
        asc = [self.objectives[c] == "min" for c in keys]
        return self.trials[self.trials["on_frontier"]].sort_values(keys, ascending=asc, kind="stable")

    @property
    def considered(self) -> pd.DataFrame:
        """The trials that took part (finished, with every objective)."""
        return self.trials[self.trials["excluded"] == ""]

    def summary(self) -> str:
        left_out = ", ".join(f"{n} {why}" for why, n in sorted(self.excluded.items())) or "none"
        names = " vs ".join(f"{c} ({d})" for c, d in self.objectives.items())
        return (f"{len(self.trials)} trials, {len(self.considered)} considered, "
                f"{int(self.trials['on_frontier'].sum())} on the frontier of {names}; left out: {left_out}")


def require_columns(df: pd.DataFrame, columns: Iterable[str]) -> None:
    """An AnalysisError naming the first column the trials lack, with the metrics they have."""
    for col in columns:
        if col not in df.columns:
            metrics = sorted(c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])
                             and c not in TrialConfig.__dataclass_fields__)
            raise AnalysisError(f"unknown column {col!r} (the trials' metrics: {', '.join(metrics) or 'none'})")


def frontier(trials: pd.DataFrame, y: str = "score", x: str = "gpu_hours",
             objectives: Iterable[str] | Mapping[str, str] | None = None, *,
             include_stopped: bool = False) -> Frontier:
    """The Pareto frontier of `y` (maximised) against `x` (minimised), or of several `objectives`.

    `include_stopped`: trials an early-stopping scheduler stopped take part (default: left out and
    counted as "stopped early", since their score and cost are those of an unfinished run).
    Raises AnalysisError for an unknown column, or when no trial is finished with every objective.
    """
    if objectives is None and x == y:
        raise AnalysisError(f"the score and the cost are both {x!r}: compare two different columns")
    goals = objectives_of(objectives if objectives is not None else {y: "max", x: "min"})
    if trials.empty:
        raise AnalysisError("no trials to compare")
    require_columns(trials, ["status"])
    stopped = _stopped(trials)
    if not ((trials["status"] == "FINISHED") | (stopped & include_stopped)).any():  # a metric never logged is no typo
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(Counter(trials["status"]).items()))
        raise AnalysisError(f"no finished trials to compare ({counts})")
    require_columns(trials, goals)
    df = trials.copy()
    df["excluded"] = _exclusions(df, list(goals), stopped, include_stopped)
    use = df["excluded"] == ""
    if not use.any():
        why = ", ".join(f"{n} {r}" for r, n in sorted(Counter(df["excluded"]).items()))
        raise AnalysisError(f"no finished trials with {', '.join(goals)} to compare ({why})")
    # Flip the maximised objectives so that lower is better everywhere.
    signs = np.array([-1.0 if d == "max" else 1.0 for d in goals.values()])
    values = df.loc[use, list(goals)].to_numpy(dtype=float) * signs
    df["on_frontier"] = False
    df.loc[use, "on_frontier"] = pareto_mask(values)
    excluded = dict(Counter(r for r in df["excluded"] if r))
    return Frontier(df, goals, excluded)


def _stopped(df: pd.DataFrame) -> pd.Series:
    """True for the trials an early-stopping scheduler stopped (their run's `stopped_early` tag)."""
    if STOPPED_TAG not in df:
        return pd.Series(False, index=df.index)
    return df[STOPPED_TAG].notna() & (df[STOPPED_TAG].astype(str) != "")


def _exclusions(df: pd.DataFrame, goals: list[str], stopped: pd.Series, include_stopped: bool) -> pd.Series:
    """Why each trial is left out ("" when it takes part): early stopping or its status first, then a
    missing objective."""
    reasons = []
    for index, row in df.iterrows():
        if stopped[index] and not include_stopped:
            reasons.append("stopped early")
            continue
        if row["status"] != "FINISHED" and not stopped[index]:
            reasons.append(str(row["status"]).lower())
            continue
        missing = [g for g in goals if not _is_number(row[g])]
        reasons.append(f"missing {missing[0]}" if missing else "")
    return pd.Series(reasons, index=df.index, dtype=object)


def _is_number(value) -> bool:
    try:
        return not np.isnan(float(value))
    except (TypeError, ValueError):
        return False
