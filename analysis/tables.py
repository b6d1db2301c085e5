"""Paper-style tables of a study (Lu et al. 2023, "An Empirical Study of Scaling Instruct-Tuned LMMs").

    from analysis import tables
    t = tables.by_size_method(trials)      # like its Table 4: score and cost per model size x method (x rank)
    e = tables.factor_effects(trials)      # like its Table 3: mean / best score per level of each factor
    c = tables.over_seeds(trials)          # one row per configuration: mean score over its seeds, interval
    f = tables.forecast_vs_measured(trials)  # per trial: the cost forecast before it ran, the measured cost, the ratio
    print(tables.to_text(t)); tables.to_markdown(t); t.to_csv("t.csv", index=False)
    tables.show(t)                         # in a notebook: the same numbers as the command line prints

Only finished trials with a score count (see analysis.pareto for why). Costs are the
mean over a row's trials: within a row they differ only by noise and the learning
rate, while the score is reported both as the best trial and the mean.

Seeds. A configuration is every param but `seed` (data order, LoRA init, dropout);
a study that runs each configuration at several seeds gets, per configuration, the
mean score over its seeds with a 95% interval (tracking.intervals.mean_interval, in score
points 0-100): at each end the wider of Student's t over the seeds and Wilson's over the
questions every seed answered. The tables then
show intervals too: `score_mean` with its t interval over the row's trials, and
`score_best` as the best configuration's mean over its seeds (not its luckiest seed)
with that configuration's interval; `seeds` counts the distinct seeds of the row.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from analysis.runs import EXTRA_SCORES, INTERVAL_ENDS, RATIOS, formatted, not_applicable_blanked
from tracking.intervals import mean_interval
from trainables.config import TrialConfig

FACTORS = ["model_size", "method", "image_size", "mix_ratio", "lora_rank", "lora_alpha", "alpha_per_rank"]
COSTS = ["gpu_hours", "dollars", "trainable_params", "peak_mem_gb", "artifact_mb"]
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmbt]?)$", re.IGNORECASE)
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def size_key(size) -> tuple:
    """Sort key of a model size: "0.3m" < "1m" < "3.6m" < "7b"; other names (hub ids) after, by name."""
    match = _SIZE.match(str(size))
    if match:
        return (0, float(match.group(1)) * _SCALE[match.group(2).lower()], "")
    return (1, 0.0, str(size))


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    """Finished trials that have a score, tidied (see `tidy`)."""
    if trials.empty or "score" not in trials:
        return trials.iloc[0:0]
    return tidy(trials[(trials["status"] == "FINISHED") & trials["score"].notna()])


def tidy(trials: pd.DataFrame) -> pd.DataFrame:
    """Params that do not apply to a trial's method blank, LoRA rank as an integer, and `alpha_per_rank`
    (lora_alpha / lora_rank: what the paper's "alpha = 2 x rank" finding is about) where it was not logged."""
    df = trials.copy()
    if "lora_alpha" in df and "lora_rank" in df:
        computed = df["lora_alpha"] / df["lora_rank"]
        df["alpha_per_rank"] = df["alpha_per_rank"].fillna(computed) if "alpha_per_rank" in df else computed
    df = not_applicable_blanked(df)
    if "lora_rank" in df:
        df["lora_rank"] = df["lora_rank"].astype("Float64").astype("Int64")
    return df


RUN_IDS = ","  # a configuration's row joins its seeds' run ids: "id1,id2,id3"


def run_ids_of(value) -> list[str]:
    """The run ids a frontier or table row stands for: one trial's, or a configuration's seeds' (joined)."""
    return str(value).split(RUN_IDS)


def configuration_keys(df: pd.DataFrame) -> list[str]:
    """The columns that make a configuration: the experiment and every param (TrialConfig's fields and
    `alpha_per_rank`) the frame has, except `seed`; none when it has no param."""
    params = [c for c in df.columns if (c in TrialConfig.__dataclass_fields__ or c == "alpha_per_rank") and c != "seed"]
    return (["experiment"] if "experiment" in df and params else []) + params


def several_seeds(trials: pd.DataFrame) -> bool:
    """Whether the finished trials were run at more than one seed."""
    df = finished(trials)
    return "seed" in df and df["seed"].nunique() > 1


def over_seeds(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of the finished trials (see `configuration_keys`): its params, `seeds` (how
    many trials it has), the mean of every metric over them, and for `score` / `text_score` with two or more
    seeds the interval of that mean (`mean_and_interval`) in `*_ci_low` / `*_ci_high` (one seed keeps its own).
    `run_id` lists the configuration's runs ("id1,id2"), `run_name` keeps the words its runs' names share."""
    return seed_means(finished(trials))


def seed_means(df: pd.DataFrame) -> pd.DataFrame:
    """`over_seeds` without the filter: every row of `df` takes part (a frontier's considered trials)."""
    keys = configuration_keys(df)
    if df.empty or not keys:  # nothing tells configurations apart: each trial is its own
        return df.drop(columns="seed", errors="ignore").assign(seeds=1)
    rows = [_configuration(group, keys) for _, group in df.groupby(keys, dropna=False, sort=False)]
    out = pd.DataFrame(rows)
    return out.astype({k: df[k].dtype for k in keys})


def _configuration(group: pd.DataFrame, keys: list[str]) -> dict:
    row = {}
    for col in group.columns.drop("seed", errors="ignore"):
        values = group[col]
        if col in keys:
            row[col] = values.iloc[0]
        elif col == "run_name":
            names = [str(n).split() for n in values.dropna()]
            row[col] = " ".join(w for w in names[0] if all(w in n for n in names[1:])) if names else None
        elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            row[col] = values.mean()
        else:  # run ids, status, study: the distinct values, in order
            row[col] = RUN_IDS.join(dict.fromkeys(str(v) for v in values.dropna())) or None
    for score in ["score"] + EXTRA_SCORES:
        if score in group and group[score].notna().any():
            row.update(zip([score, *(score + end for end in INTERVAL_ENDS)], mean_and_interval(group, score)))
    row["seeds"] = len(group)
    return row


def mean_and_interval(trials: pd.DataFrame, score: str = "score") -> tuple[float, float, float]:
    """(mean, low, high) of `score` over the trials: from two values on, Student's t interval widened to the
    Wilson interval over the questions they answered (`<score>_n`, where logged; tracking.intervals.
    mean_interval), else the one trial's own interval (`<score>_ci_low`, `_ci_high`; NaN where it logged none)."""
    values = trials[score].dropna()
    if len(values) >= 2:
        questions = trials.loc[values.index, score + "_n"].mean() if score + "_n" in trials else None
        interval = mean_interval(values, questions if questions == questions else None)  # NaN: none logged
        return interval.value, interval.low, interval.high
    one = trials.loc[values.index]
    ends = [one[score + end].mean() if score + end in one else math.nan for end in INTERVAL_ENDS]
    return (values.mean(), *ends)


def _seed_columns(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per group of `keys` (in groupby order): distinct seeds, the mean score with its t interval over the
    group's trials, and the best configuration's mean over its seeds with its interval."""
    rows = []
    for _, group in df.groupby(keys, dropna=False, sort=False):
        configs = seed_means(group)
        best = configs.loc[[configs["score"].idxmax()]]
        rows.append({"seeds": group["seed"].nunique(),
                     **dict(zip(["score_best", "score_best_ci_low", "score_best_ci_high"], mean_and_interval(best))),
                     **dict(zip(["score_mean", "score_mean_ci_low", "score_mean_ci_high"], mean_and_interval(group)))})
    return pd.DataFrame(rows)


def _sort_levels(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    key = {"model_size": lambda s: s.map(size_key)}
    return df.sort_values(columns, key=lambda s: key.get(s.name, lambda v: v)(s), kind="stable",
                          na_position="first").reset_index(drop=True)


def by_size_method(trials: pd.DataFrame, with_rank: bool = True) -> pd.DataFrame:
    """One row per model size x method (x LoRA rank): trials, best and mean score, mean costs; with several
    seeds, `seeds` and the scores' intervals (see the module's docstring)."""
    df = finished(trials)
    keys = [k for k in ["model_size", "method"] + (["lora_rank"] if with_rank else []) if k in df]
    if df.empty or not keys:
        return pd.DataFrame(columns=keys + ["trials", "score_best", "score_mean"])
    grouped = df.groupby(keys, dropna=False, sort=False)
    out = grouped.agg(trials=("score", "size"), score_best=("score", "max"), score_mean=("score", "mean"))
    costs = [c for c in COSTS if c in df]
    out = out.join(grouped[costs].mean()).reset_index()
    if several_seeds(df):
        out = _with_seed_columns(out, df, keys, before="score_best")
    return _sort_levels(out, keys)


def _with_seed_columns(out: pd.DataFrame, df: pd.DataFrame, keys: list[str], before: str) -> pd.DataFrame:
    """`out` (one row per group of `keys`, in groupby order) with its score columns replaced by
    `_seed_columns`' and those placed before the column `before`."""
    seeded = _seed_columns(df, keys)
    rest = out.drop(columns=[c for c in seeded if c in out])
    at = list(out.columns).index(before)
    kept = [c for c in out.columns[:at] if c in rest]
    return pd.concat([rest[kept], seeded, rest.drop(columns=kept)], axis=1)


def factor_effects(trials: pd.DataFrame, factors: list[str] | None = None, min_levels: int = 2) -> pd.DataFrame:
    """For each factor with at least `min_levels` levels: trials, mean/best/std score and mean cost per level.

    A factor the study never varied has no effect to show, so by default it is left out.
    LoRA rank and alpha count only the trials of methods that have them. With several seeds, `seeds` and
    the scores' intervals (see the module's docstring).
    """
    df = finished(trials)
    seeded = several_seeds(df)
    parts = []
    for factor in factors or FACTORS:
        if factor not in df:
            continue
        sub = df[df[factor].notna()]
        if sub[factor].nunique() < min_levels:
            continue
        g = sub.groupby(factor, sort=False)
        part = g.agg(trials=("score", "size"), score_mean=("score", "mean"), score_best=("score", "max"),
                     score_std=("score", "std"))
        if "gpu_hours" in sub:
            part["gpu_hours"] = g["gpu_hours"].mean()
        part = part.reset_index()
        if seeded:
            part = _with_seed_columns(part, sub, [factor], before="score_mean")
        part = _sort_levels(part, [factor]).rename(columns={factor: "level"})
        part.insert(0, "factor", factor)
        part["level"] = part["level"].map(lambda v: f"{v:g}" if isinstance(v, float) else str(v))
        parts.append(part)
    columns = ["factor", "level", "trials", "score_mean", "score_best", "score_std", "gpu_hours"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def forecast_vs_measured(trials: pd.DataFrame) -> pd.DataFrame:
    """Per finished trial that logged a forecast (`forecast_gpu_hours`, `forecast_dollars`): the forecast,
    the measured cost and their ratio, measured / forecast (1.00: exact; 2.00: it cost twice the forecast).

    Empty (no rows, no columns) when no trial logged a forecast: a report then leaves the table out.
    Only finished trials count: a failed or stopped trial's measured cost is that of part of the work.
    """
    pairs = {ratio: (f, m) for ratio, (f, m) in RATIOS.items() if f in trials and m in trials}
    if trials.empty or "status" not in trials or not pairs:
        return pd.DataFrame()
    df = tidy(trials[trials["status"] == "FINISHED"])
    df = df[df[[f for f, _ in pairs.values()]].notna().any(axis=1)]
    if df.empty:
        return pd.DataFrame()
    keys = [c for c in ("run_name", "model_size", "method", "lora_rank") if c in df and df[c].notna().any()]
    out = df[keys].copy()
    for ratio, (forecast, measured) in pairs.items():
        out[forecast], out[measured] = df[forecast], df[measured]
        out[ratio] = df[measured] / df[forecast].where(df[forecast] > 0)
    sort = [k for k in ("model_size", "method", "lora_rank") if k in out]
    return _sort_levels(out, sort) if sort else out.reset_index(drop=True)


def to_text(table: pd.DataFrame) -> str:
    """Aligned text for the terminal, numbers formatted as in the study's table."""
    return "(no finished trials)" if table.empty else formatted(table).to_string(index=False)


class Shown:
    """A table as a notebook shows it (HTML) and as text elsewhere, the numbers formatted as the command line
    prints them, without the row index. `.table`: the formatted frame (strings)."""

    def __init__(self, table: pd.DataFrame):
        self.table = formatted(table)

    def _repr_html_(self) -> str:
        return self.table.to_html(index=False)

    def __repr__(self) -> str:
        return "(no rows)" if self.table.empty else self.table.to_string(index=False)


def show(table: pd.DataFrame) -> Shown:
    """A table for a notebook: every number formatted as the command line prints it (tiny costs in
    scientific notation, counts with separators, "-" where missing), without the row index."""
    return Shown(table)


def to_markdown(table: pd.DataFrame, empty: str = "no finished trials") -> str:
    """A GitHub-flavoured Markdown table (pandas' to_markdown would need `tabulate` at run time); `empty`
    says why there is none."""
    if table.empty:
        return f"_({empty})_\n"
    view = formatted(table).astype(str)
    lines = ["| " + " | ".join(view.columns) + " |", "|" + "|".join("---" for _ in view.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in view.itertuples(index=False)]
    return "\n".join(lines) + "\n"
