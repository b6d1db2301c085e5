"""The Pareto frontier of a study: the trials no other trial beats.

    from analysis.pareto import frontier
    front = frontier(trials, y="score", x="gpu_hours")            # score up, cost down
    front = frontier(trials, objectives=["score", "gpu_hours", "trainable_params"])
    front = frontier(trials, include_stopped=True)                 # early-stopped trials take part too
    front.trials        # every trial, with `on_frontier` and `excluded` (why it was left out)
    front.frontier      # the frontier's trials, cheapest first
    front.excluded      # {"failed": 2, "stopped early": 3, "missing gpu_hours": 1, ...}
    front.trials["contender"]  # not significantly dominated (where the score has an interval)

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

Seeds. When the trials that take part were run at several seeds (their `seed` param
varies), the points are configurations, not trials: each configuration's mean over its
seeds (analysis.tables.over_seeds: every metric averaged, the score's interval over seeds
and questions, `seeds` counts them, `run_id` lists the runs "id1,id2"); one noisy
seed would otherwise win the frontier by luck. `Frontier.trials` then holds one row per
configuration that took part plus one per trial left out. `over_seeds=False` keeps trials.

Noise. Where the score has a 95% interval (`score_ci_low`, `score_ci_high`: Wilson over
the questions, or over seeds and questions), a point is significantly dominated when another costs
no more (the first cost, e.g. gpu_hours) and its interval's low end lies above this
point's high end. `contender` is True for the points that are not: they may belong on
the frontier for all the evaluation can tell (every frontier point is one). It is <NA>
for a point without an interval, which also dominates no other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from analysis import tables
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
    trials: pd.DataFrame  # every trial (configuration): `on_frontier` (bool), `excluded` ("" when it took part)
    objectives: dict[str, str]
    excluded: dict[str, int] = field(default_factory=dict)
    over_seeds: bool = False  # the points that took part are configurations: means over their seeds

    @property
    def costs(self) -> list[str]:
        return [c for c, d in self.objectives.items() if d == "min"]

    def in_order(self, rows: pd.DataFrame) -> pd.DataFrame:
        """`rows` sorted as the frontier is listed: by the first cost (cheapest first), then the objectives."""
        keys = self.costs[:1] + [c for c in self.objectives if c not in self.costs[:1]]
        return rows.sort_values(keys, ascending=[self.objectives[c] == "min" for c in keys], kind="stable")

    @property
    def frontier(self) -> pd.DataFrame:
        """The frontier's trials, sorted by the first cost (cheapest first), then the first objective."""
        return self.in_order(self.trials[self.trials["on_frontier"]])

    @property
    def considered(self) -> pd.DataFrame:
        """The trials that took part (finished, with every objective)."""
        return self.trials[self.trials["excluded"] == ""]

    def summary(self) -> str:
        left_out = ", ".join(f"{n} {why}" for why, n in sorted(self.excluded.items())) or "none"
        names = " vs ".join(f"{c} ({d})" for c, d in self.objectives.items())
        on = int(self.trials["on_frontier"].sum())
        if not self.over_seeds:
            return (f"{len(self.trials)} trials, {len(self.considered)} considered, "
                    f"{on} on the frontier of {names}; left out: {left_out}")
        seeds = self.considered["seeds"]
        trials = int(seeds.sum()) + len(self.trials) - len(seeds)
        span = f"{seeds.min():.0f}" + (f"-{seeds.max():.0f}" if seeds.max() > seeds.min() else "")
        return (f"{trials} trials, {int(seeds.sum())} considered as {len(seeds)} configurations (means over "
                f"{span} seeds), {on} on the frontier of {names}; left out: {left_out}")


def require_columns(df: pd.DataFrame, columns: Iterable[str]) -> None:
    """An AnalysisError naming the first column the trials lack, with the metrics they have."""
    for col in columns:
        if col not in df.columns:
            metrics = sorted(c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])
                             and c not in TrialConfig.__dataclass_fields__)
            raise AnalysisError(f"unknown column {col!r} (the trials' metrics: {', '.join(metrics) or 'none'})")


def frontier(trials: pd.DataFrame, y: str = "score", x: str = "gpu_hours",
             objectives: Iterable[str] | Mapping[str, str] | None = None, *,
             include_stopped: bool = False, over_seeds: bool = True) -> Frontier:
    """The Pareto frontier of `y` (maximised) against `x` (minimised), or of several `objectives`.

    `include_stopped`: trials an early-stopping scheduler stopped take part (default: left out and
    counted as "stopped early", since their score and cost are those of an unfinished run); they are
    never averaged with finished seeds. `over_seeds`: configurations run at several seeds take part as
    their means (see the module's docstring).
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
    excluded = dict(Counter(r for r in df["excluded"] if r))
    pooled = use & ~stopped
    seeded = over_seeds and "seed" in df and df.loc[pooled, "seed"].nunique() > 1
    if seeded:
        means = tables.seed_means(tables.tidy(df[pooled])).assign(excluded="")
        means["excluded"] = _incomplete(means, tables.tidy(df))  # a seed failed or was stopped: no mean of it
        excluded.update(Counter(r for r in means["excluded"] if r))
        rest = df[~pooled].assign(seeds=np.where(use[~pooled], 1, np.nan))  # left out, or stopped and let in
        df = pd.concat([means, rest], ignore_index=True) if len(rest) else means
        use = df["excluded"] == ""
    # Flip the maximised objectives so that lower is better everywhere.
    signs = np.array([-1.0 if d == "max" else 1.0 for d in goals.values()])
    values = df.loc[use, list(goals)].to_numpy(dtype=float) * signs
    df["on_frontier"] = False
    df.loc[use, "on_frontier"] = pareto_mask(values)
    score = next((c for c, d in goals.items() if d == "max"), None)
    cost = next((c for c, d in goals.items() if d == "min"), None)
    if score and cost and {score + "_ci_low", score + "_ci_high"} <= set(df.columns):
        df["contender"] = pd.Series(pd.NA, index=df.index, dtype="boolean")
        df.loc[use, "contender"] = contenders(df[use], cost, score)
    return Frontier(df, goals, excluded, over_seeds=seeded)


def _incomplete(means: pd.DataFrame, trials: pd.DataFrame) -> list[str]:
    """For each configuration mean: "incomplete seeds" when some of its seeds did not finish (failed,
    stopped early, or still running: the search told Optuna PRUNED or FAIL for it, and the mean of the
    seeds that finished would flatter it), else ""."""
    keys = [k for k in tables.configuration_keys(trials) if k in means]
    planned = trials.groupby(keys, dropna=False, sort=False)["seed"].nunique()
    out = []
    for _, row in means.iterrows():
        key = tuple(row[k] for k in keys)
        seeds = planned.get(key if len(keys) > 1 else key[0], row["seeds"])
        out.append("incomplete seeds" if row["seeds"] < seeds else "")
    return out


def contenders(points: pd.DataFrame, cost: str, score: str) -> pd.Series:
    """True for each point that no other point significantly dominates: none costs no more and has a
    score interval (`<score>_ci_low` .. `<score>_ci_high`) wholly above this point's. <NA> for a point
    without an interval or cost; such a point dominates no other either."""
    low, high, x = points[score + "_ci_low"], points[score + "_ci_high"], points[cost]
    known = low.notna() & high.notna() & x.notna()
    out = pd.Series(pd.NA, index=points.index, dtype="boolean")
    for i in points.index[known]:
        out[i] = not ((x[known] <= x[i]) & (low[known] > high[i])).any()
    return out


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
