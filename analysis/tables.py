"""Paper-style tables of a study (Lu et al. 2023, "An Empirical Study of Scaling Instruct-Tuned LMMs").

    from analysis import tables
    t = tables.by_size_method(trials)      # like its Table 4: score and cost per model size x method (x rank)
    e = tables.factor_effects(trials)      # like its Table 3: mean / best score per level of each factor
    f = tables.forecast_vs_measured(trials)  # per trial: the cost forecast before it ran, the measured cost, the ratio
    print(tables.to_text(t)); tables.to_markdown(t); t.to_csv("t.csv", index=False)
    tables.show(t)                         # in a notebook: the same numbers as the command line prints

Only finished trials with a score count (see analysis.pareto for why). Costs are the
mean over a row's trials: within a row they differ only by noise and the learning
rate, while the score is reported both as the best trial and the mean.
"""

from __future__ import annotations

import re

import pandas as pd

from analysis.runs import RATIOS, formatted, not_applicable_blanked

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


def _sort_levels(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    key = {"model_size": lambda s: s.map(size_key)}
    return df.sort_values(columns, key=lambda s: key.get(s.name, lambda v: v)(s), kind="stable",
                          na_position="first").reset_index(drop=True)


def by_size_method(trials: pd.DataFrame, with_rank: bool = True) -> pd.DataFrame:
    """One row per model size x method (x LoRA rank): trials, best and mean score, mean costs."""
    df = finished(trials)
    keys = [k for k in ["model_size", "method"] + (["lora_rank"] if with_rank else []) if k in df]
    if df.empty or not keys:
        return pd.DataFrame(columns=keys + ["trials", "score_best", "score_mean"])
    grouped = df.groupby(keys, dropna=False, sort=False)
    out = grouped.agg(trials=("score", "size"), score_best=("score", "max"), score_mean=("score", "mean"))
    costs = [c for c in COSTS if c in df]
    out = out.join(grouped[costs].mean()).reset_index()
    return _sort_levels(out, keys)


def factor_effects(trials: pd.DataFrame, factors: list[str] | None = None, min_levels: int = 2) -> pd.DataFrame:
    """For each factor with at least `min_levels` levels: trials, mean/best/std score and mean cost per level.

    A factor the study never varied has no effect to show, so by default it is left out.
    LoRA rank and alpha count only the trials of methods that have them.
    """
    df = finished(trials)
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
        part = _sort_levels(part.reset_index(), [factor]).rename(columns={factor: "level"})
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
