"""Do the papers' seven directions hold in our studies? Each effect with its 95% interval and a verdict.

    python -m analysis.report --experiment paper_table4 --experiment paper_table3 [--tracking-uri URI]
        [--out report] [--force] [--notes NOTES.md]

Prints the table and writes OUT/REPORT.md (default OUT: report/ in the working directory) with the
command that made it, the trials and seeds per experiment, the table, the --notes file's text (its
"Notes" section: what the studies tried, why a direction does not hold), and its plots beside it:
report-directions.png (each direction's effect, its interval and its threshold) and
report-frontier-<experiment>.png. Files in
OUT that this command did not write (or that changed since it did) are never replaced unless
`--force` (analysis.frontier.check_out's rule). Exit 0 on success, 2 on bad input (one `error:`
line naming the experiment, store or file), 1 otherwise.

Sources, stated as their authors found them (qualitatively; the numbers are theirs to quote):
- Lu et al. 2023, "An Empirical Study of Scaling Instruct-Tuned Large Multimodal Models" (LLaVA
  at 33B and 65B): directions 1-6.
- Luo et al. 2023, "Cheap and Quick: Efficient Vision-Language Instruction Tuning for Large Language
  Models" (LaVIN, mixture-of-modality adaptation, MMA): direction 7.

An effect is A's score over B's in points (0-100), two groups of finished trials, one trial being
one seed of one configuration, with a 95% interval; the seed, not the trial, is the independent unit,
since every configuration at one seed shares its data order. Where 2 seeds or more have twins (a
trial of A and one of B at the same seed, the same configuration but the factor compared; twins also
share the seed's initial adapter weights and dropout): the mean over seeds of each seed's mean twin
difference, with the paired t interval over seeds (tracking.intervals.paired_difference; `matched_on`
then ends in "paired by seed (k seeds)"); trials without a twin are left out. Otherwise mean(A) -
mean(B) with Welch's t interval over the seeds' means ("over seeds' means" where a seed has several
configurations), or over the trials where a group has one seed
(tracking.intervals.difference). The groups are matched where the data allows: first on every
other param both groups have (so a configuration counts only if its twin was run at the other
level), then on fewer (e.g. the same model sizes), and compared unmatched only where a direction
allows it; the table's `matched_on` says which. "The paper's LoRA" is the recipe the scaling paper
recommends: lora trials with alpha = 2 x rank at the highest lr of the lora trials (direction 3
takes its largest rank, the paper's comparison with full fine-tuning; direction 7 whichever
ranks the matching finds twins at).

Verdicts: "holds" (the whole interval lies where the paper says), "not resolved" (the interval
reaches both inside and outside the claim), "does not hold" (the whole interval lies outside),
"not measured" (a group has fewer than 2 trials; `note` says which). The experiments' trials are
pooled, so a direction may come from any of them.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from analysis import plots, tables
from analysis.frontier import BadInput, OneLineParser, check_out, default_out, record_written
from analysis.pareto import frontier
from analysis.runs import AnalysisError, formatted, load_studies
from tracking.intervals import Interval, difference, paired_difference
from tracking.metrics import category_metric

HOLDS, NOT_RESOLVED, DOES_NOT_HOLD, NOT_MEASURED = "holds", "not resolved", "does not hold", "not measured"
REPORT, FOREST = "REPORT.md", "report-directions.png"
WRITTEN = ".analysis-report.json"
LU, LUO = "Lu et al. 2023", "Luo et al. 2023, LaVIN"
SHOWN = ["direction", "finding", "compared", "n_a", "n_b", "effect", "effect_ci_low", "effect_ci_high", "claim",
         "verdict", "matched_on", "note"]


class NotMeasured(Exception):
    """A direction the trials cannot measure; the message says which group is missing or too small."""


@dataclass
class Comparison:
    """Two groups of trials (A - B is the effect), what they are and were matched on, and `fails`: the
    direction does not hold whatever the effect (a second condition unmet; the note says which)."""
    a: pd.DataFrame
    b: pd.DataFrame
    compared: str
    matched_on: str
    on: list[str]                # the columns matched on (the twins at one seed share them: `pairs`)
    note: str = ""
    fails: bool = False


@dataclass(frozen=True)
class Direction:
    number: int
    finding: str                 # short, for the table and the plot
    paper: str                   # what the paper found, in words
    source: str
    low: float                   # the effect the finding allows: low .. high (score points)
    high: float
    closed: bool                 # whether the bounds themselves are allowed
    compare: Callable[[pd.DataFrame], Comparison]
    metric: str = "score"

    @property
    def claim(self) -> str:
        if self.high == np.inf:
            return f"{'>=' if self.closed else '>'} {self.low:g}"
        if self.low == -np.inf:
            return f"{'<=' if self.closed else '<'} {self.high:g}"
        return f"within [{self.low:g}, {self.high:g}]"

    def allows(self, value: float) -> bool:
        return self.low <= value <= self.high if self.closed else self.low < value < self.high


# --- the groups ---

def matched(a: pd.DataFrame, b: pd.DataFrame, free: set[str], fallbacks: list[list[str]] = ()) -> tuple:
    """(A, B, what they were matched on, the columns matched on): the trials of each whose configuration has a
    twin in the other, first on every param both groups have but `free` (and the seed), then on each of
    `fallbacks` in turn ([]: unmatched), keeping the first that leaves 2 trials a side (else the last)."""
    params = [c for c in tables.configuration_keys(a) if c != "experiment" and c not in free
              and c in b and a[c].notna().any() and b[c].notna().any()]
    tries = [(params, "every other param")] + [(on, ", ".join(on) or "nothing (unmatched)") for on in fallbacks]
    for on, said in tries:
        on = [c for c in on if c in a and c in b]
        ma, mb = _twins(a, b, on)
        if len(ma) >= 2 and len(mb) >= 2:
            break
    # twins at one seed are the same configuration but the factor: only a match on every other param pairs
    return ma, mb, said, (on if said == "every other param" else None)


def _seeded(group: pd.DataFrame, metric: str) -> pd.DataFrame | None:
    """The trials with a `metric`, the seed as a number (MLflow may give it as text); None where one has no seed
    (or there is none): such a trial is never paired nor averaged by seed."""
    group = group[group[metric].notna()]
    seeds = pd.to_numeric(group["seed"], errors="coerce") if "seed" in group else None
    if group.empty or seeds is None or seeds.isna().any():
        return None
    return group.assign(seed=seeds)


def pairs(a: pd.DataFrame, b: pd.DataFrame, on: list[str], metric: str) -> tuple[list, list] | None:
    """Per seed, (A's mean of `metric`, B's mean) over the (configuration on `on`, seed) cells that have their twin
    cell in the other group, in seed order, where 2 seeds or more have twins; else None. Cells without a twin (a
    failed trial's partner) are left out, as `matched` leaves out configurations without one.

    Twins at one seed share the data order, the initial adapter weights and the dropout masks (common random
    numbers), so their difference leaves the seed's noise out (tracking.intervals.paired_difference). Several
    configurations at one seed share its data order too, so their differences are not independent: they are
    averaged per seed (each seed weighs the same) and the interval is over seeds (seeds - 1 degrees of freedom;
    the seed is the cluster), over a balanced subset of the twin cells (`_balanced`: every seed with the same
    configurations). A configuration run twice at one seed (say by two experiments) is one cell, its mean.
    Trials without a seed are never paired."""
    a, b = _seeded(a, metric), _seeded(b, metric)
    if a is None or b is None:
        return None
    keys = [*on, "seed"]
    cells = [g.groupby(keys, dropna=False, as_index=False)[metric].mean() for g in (a, b)]
    twins = _balanced(cells[0].merge(cells[1], on=keys, how="inner", suffixes=("_a", "_b")), on)  # NaN keys match
    per_seed = twins.groupby("seed")[[f"{metric}_a", f"{metric}_b"]].mean()
    if len(per_seed) < 2:
        return None
    return list(per_seed[f"{metric}_a"]), list(per_seed[f"{metric}_b"])


def _balanced(cells: pd.DataFrame, on: list[str]) -> pd.DataFrame:
    """The cells (rows keyed by configuration on `on` and seed) of a balanced subset: every seed with the same
    configurations, so each seed's mean is over like for like (pooling a 5-seed study with a 3-seed one would
    otherwise make seeds 3 and 4 the mean of one configuration and seeds 0-2 of several). Of the configurations
    run at every seed and the seeds that ran every configuration, the larger (more seeds where equal)."""
    config = cells.groupby(on, dropna=False, sort=False).ngroup() if on else pd.Series(0, index=cells.index)
    seeds = cells.groupby(config)["seed"].nunique()
    everywhere = cells[config.isin(seeds.index[seeds == cells["seed"].nunique()])]
    configs = config.groupby(cells["seed"]).nunique()
    complete = cells[cells["seed"].isin(configs.index[configs == config.nunique()])]
    return max((everywhere, complete), key=lambda c: (len(c), c["seed"].nunique()))


def seed_means(group: pd.DataFrame, metric: str) -> pd.Series | None:
    """`metric`'s mean per seed over the group's configurations (a balanced subset: `_balanced`), or None where
    that leaves fewer than 2 seeds or a trial has none (the seed is the independent unit, as in `pairs`)."""
    seeded = _seeded(group, metric)
    if seeded is None:
        return None
    on = [c for c in tables.configuration_keys(seeded) if c not in ("experiment", "seed")]
    cells = seeded.groupby([*on, "seed"], dropna=False, as_index=False)[metric].mean()
    means = _balanced(cells, on).groupby("seed")[metric].mean()
    return means if len(means) >= 2 else None


def _twins(a: pd.DataFrame, b: pd.DataFrame, on: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trials of a and of b whose values of `on` occur in the other group (all of them for no `on`)."""
    if not on:
        return a, b
    ids = pd.concat([a[on], b[on]], ignore_index=True).groupby(on, dropna=False, sort=False).ngroup().to_numpy()
    ids_a, ids_b = ids[:len(a)], ids[len(a):]
    return a[np.isin(ids_a, ids_b)], b[np.isin(ids_b, ids_a)]


def _need(group: pd.DataFrame, what: str) -> pd.DataFrame:
    if len(group) < 2:
        raise NotMeasured(f"{what}: {len(group)} trial{'s' * (len(group) != 1)} (needs 2)")
    return group


def _method(df: pd.DataFrame, name: str) -> pd.DataFrame:
    return df[df["method"] == name] if "method" in df else df.iloc[0:0]


def _extremes(df: pd.DataFrame, column: str, what: str, key=None) -> tuple:
    """(largest level, smallest level) of `column` in df; NotMeasured when it has one level or none."""
    levels = sorted(df[column].dropna().unique(), key=key) if column in df else []
    if len(levels) < 2:
        raise NotMeasured(f"{what} at {len(levels)} {column} level{'s' * (len(levels) != 1)}"
                          + (f" ({levels[0]})" if levels else ""))
    return levels[-1], levels[0]


def paper_lora(df: pd.DataFrame, largest_rank: bool = False) -> pd.DataFrame:
    """The scaling paper's LoRA recipe: lora trials with alpha = 2 x rank at the highest lr of the lora
    trials (of the largest such rank if `largest_rank`)."""
    lora = _method(df, "lora")
    if lora.empty:
        raise NotMeasured("no lora trials")
    if missing := [c for c in ("lr", "lora_rank", "alpha_per_rank") if c not in lora]:
        raise NotMeasured(f"the lora trials logged no {', '.join(missing)}")
    top = lora["lr"].max()
    recipe = lora[np.isclose(lora["alpha_per_rank"].astype(float), 2.0) & np.isclose(lora["lr"], top)]
    if recipe.empty:
        raise NotMeasured(f"no lora trial at alpha = 2 x rank and lr {top:g} (the highest lora lr)")
    return recipe[recipe["lora_rank"] == recipe["lora_rank"].max()] if largest_rank else recipe


def per_type(a: pd.DataFrame, b: pd.DataFrame, on: list[str]) -> str:
    """The effect on each question type's score (`score/<type>`, logged where records name a `category`), as
    "per type: color +1.2 [-3.0, +5.4], ..." (effect_of's interval), for the types both groups scored at least twice;
    "" where none: which kinds of question a factor helps, e.g. a finer tower on questions about small details."""
    types = sorted(c for c in a.columns if c.startswith("score/") and c in b
                   and a[c].notna().sum() >= 2 and b[c].notna().sum() >= 2)
    effects = [f"{t.split('/', 1)[1]} {effect_of(a, b, t, on)[0]}" for t in types]
    return "per type: " + ", ".join(effects) if effects else ""


def _larger_llm(df: pd.DataFrame) -> Comparison:
    lora = _method(df, "lora")
    big, small = _extremes(lora, "model_size", "lora trials", key=tables.size_key)
    a, b, on, keys = matched(lora[lora["model_size"] == big], lora[lora["model_size"] == small], {"model_size"}, [[]])
    return Comparison(a, b, f"lora {big} - lora {small}", on, keys, per_type(a, b, keys))


def _resolution(df: pd.DataFrame) -> Comparison:
    high, low = _extremes(df, "image_size", "trials")
    a, b, on, keys = matched(df[df["image_size"] == high], df[df["image_size"] == low], {"image_size", "vision_tower"},
                             [[]])
    return Comparison(a, b, f"{high:g} px - {low:g} px", on, keys, per_type(a, b, keys))


def _lora_vs_full(df: pd.DataFrame) -> Comparison:
    lora, full = paper_lora(df, largest_rank=True), _need(_method(df, "full"), "full")
    a, b, on, keys = matched(lora, full, {"method", "lr"}, [["model_size"]])
    rank, alpha, lr = lora["lora_rank"].iloc[0], lora["lora_alpha"].iloc[0], lora["lr"].iloc[0]
    return Comparison(a, b, f"lora r{rank} a{alpha:g} lr{lr:g} - full", on, keys)


def _low_lr_or_alpha(df: pd.DataFrame) -> Comparison:
    lora, recipe = _method(df, "lora"), paper_lora(df)
    top = lora["lr"].max()
    low = lora[np.isclose(lora["alpha_per_rank"].astype(float), 0.25) | (lora["lr"] <= top / 10 * (1 + 1e-9))]
    _need(low, f"lora at alpha = rank / 4 or lr <= {top / 10:g}")
    a, b, on, keys = matched(low, recipe, {"lr", "lora_alpha", "alpha_per_rank"},
                       [["model_size", "lora_rank"], ["lora_rank"]])
    return Comparison(a, b, f"lora a=r/4 or lr<={top / 10:g} - lora a=2r lr{top:g}", on, keys)


def _qlora_vs_lora(df: pd.DataFrame) -> Comparison:
    qlora, lora = _need(_method(df, "qlora"), "qlora"), _need(_method(df, "lora"), "lora")
    a, b, on, keys = matched(qlora, lora, {"method"}, [["model_size", "lora_rank", "lora_alpha", "lr"]])
    return Comparison(a, b, "qlora - lora", on, keys)


def _text_mixing(df: pd.DataFrame) -> Comparison:
    if "text_score" not in df or "mix_ratio" not in df:
        raise NotMeasured("no text_score (no language-only eval split) or no mix_ratio")
    text = df[df["text_score"].notna()]
    a, b = _need(text[text["mix_ratio"] > 0], "mix_ratio > 0"), _need(text[text["mix_ratio"] == 0], "mix_ratio 0")
    a, b, on, keys = matched(a, b, {"mix_ratio"}, [[]])
    scored = a["score"].notna().sum() >= 2 and b["score"].notna().sum() >= 2
    note = f"score: {effect_of(a, b, 'score', keys)[0]}" if scored else ""
    return Comparison(a, b, "mix > 0 - mix 0 (text_score)", on, keys, note)


def _mma_vs_lora(df: pd.DataFrame) -> Comparison:
    """MMA against the paper's LoRA at the same model size and seed. MMA has no stage 1 (LaVIN tunes end to end:
    stage1_steps 0), so stage 1's settings are not part of the match. The parameter share is per model size (the
    mean of MMA's trainable params over LoRA's at that size), and the direction needs it under 1/10 at every size."""
    mma, lora = _need(_method(df, "mma"), "mma"), paper_lora(df)  # at any rank: its twins decide which
    a, b, on, keys = matched(mma, lora, {"method", "lr", "stage1_steps"}, [["model_size"]])
    if "trainable_params" not in df or a["trainable_params"].isna().all() or b["trainable_params"].isna().all():
        raise NotMeasured("no trainable_params logged")
    shares = (a.groupby("model_size")["trainable_params"].mean()
              / b.groupby("model_size")["trainable_params"].mean()).dropna()
    shares = shares.reindex(sorted(shares.index, key=tables.size_key))
    ranks = "/".join(str(r) for r in sorted(b["lora_rank"].dropna().unique()))
    said = ", ".join(f"{size} {share:.3g}" for size, share in shares.items())
    return Comparison(a, b, f"mma - lora r{ranks} a=2r", on, keys,
                      f"trainable params mma / lora: {said} (needs < 0.1 at each size)",
                      fails=shares.empty or not (shares < 0.1).all())


DIRECTIONS = [
    Direction(1, "larger LLM scores higher", "scaling LLaVA's LLM up (to 33B and 65B) improves its scores", LU,
              0, np.inf, False, _larger_llm),
    Direction(2, "higher resolution scores higher", "a higher image resolution (336 over 224 px) scores higher", LU,
              0, np.inf, False, _resolution),
    Direction(3, "LoRA (a=2r, high lr) within 2 of full", "LoRA (and QLoRA) with well-chosen hyperparameters, alpha "
              "= 2 x rank and a high learning rate, performs comparably to full fine-tuning", LU,
              -2, np.inf, True, _lora_vs_full),
    Direction(4, "low lr or alpha clearly worse", "LoRA needs a high learning rate and alpha: lower values score "
              "clearly lower", LU, -np.inf, 0, False, _low_lr_or_alpha),
    Direction(5, "QLoRA within 1 of LoRA", "QLoRA performs on par with LoRA at the same settings", LU,
              -1, 1, True, _qlora_vs_lora),
    Direction(6, "language-only data keeps text_score (>= 0)", "mixing language-only instruction data (ShareGPT) into visual "
              "instruction tuning keeps or improves the language skill without hurting the multimodal score", LU,
              0, np.inf, True, _text_mixing, "text_score"),
    Direction(7, "MMA within 3 of LoRA, < 1/10 params", "mixture-of-modality adaptation reaches accuracy competitive "
              "with fully tuned multimodal models while training a small fraction of the parameters", LUO,
              -3, np.inf, True, _mma_vs_lora),
]


# --- effects and verdicts ---

def effect_of(a: pd.DataFrame, b: pd.DataFrame, metric: str, on: list[str] | None = None) -> tuple[Interval, str]:
    """(the effect of A over B on `metric` with its 95% interval, how it was computed: "" or a note for
    `matched_on`). Where 2 seeds or more have twins on `on` (`pairs`; None: never paired): the mean over seeds
    of each seed's mean twin difference, with the paired t interval over seeds ("paired by seed (k seeds)");
    where every seed's difference is the same (no spread to pair on), Welch's over the seeds' means. Otherwise,
    where each group has 2 seeds or more: mean(A) - mean(B) with Welch's interval over the seeds' means
    (configurations at one seed share its data order; "over seeds' means" where a seed has several), else
    Welch's over the trials. Newcombe's over the questions, `<metric>_n`, where nothing has any spread
    (tracking.intervals.difference)."""
    base, _, category = metric.partition("/")  # a question type's count is `score_n/<type>`, not `score/<type>_n`
    n = category_metric(f"{base}_n", category) if category else f"{base}_n"
    questions = (a[n].mean(), b[n].mean()) if n in a and n in b and a[n].notna().any() and b[n].notna().any() \
        else None
    twins = pairs(a, b, on, metric) if on is not None else None
    if twins is not None:
        diffs = [x - y for x, y in zip(*twins)]
        spread = not math.isclose(max(diffs), min(diffs), abs_tol=1e-9)
        return paired_difference(*twins, questions), f"paired by seed ({len(diffs)} seeds)" if spread else ""
    means = seed_means(a, metric), seed_means(b, metric)
    if means[0] is not None and means[1] is not None:
        several = any(len(m) < g[metric].notna().sum() for m, g in zip(means, (a, b)))
        return difference(*means, questions), "over seeds' means" if several else ""
    return difference(a[metric].dropna(), b[metric].dropna(), questions), ""


def verdict(direction: Direction, effect: Interval) -> str:
    """holds: the whole interval within the claim; does not hold: the whole interval outside it (an estimate
    against the claim with an interval that reaches it, e.g. -9.4 [-92.3, +73.6] for "> 0", is not resolved,
    as one for the claim would be); not resolved otherwise."""
    if direction.allows(effect.low) and direction.allows(effect.high):
        return HOLDS
    below = effect.high < direction.low or (effect.high == direction.low and not direction.closed)
    above = effect.low > direction.high or (effect.low == direction.high and not direction.closed)
    return DOES_NOT_HOLD if below or above else NOT_RESOLVED


def assess(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per direction: `compared` (A - B), `n_a`, `n_b`, `effect` with `effect_ci_low` / `_high`
    (score points; effect_of: the paired t interval over seeds of twins, or Welch's over the groups' seeds'
    means or trials), `claim` (the effect the paper's finding allows), `verdict`, `matched_on`, `note`, and `low` / `high` (the claim's bounds) and `paper`,
    `source` for the report. `trials` may be several experiments' (analysis.runs.load_studies)."""
    df = tables.finished(trials)
    rows = []
    for d in DIRECTIONS:
        row = {"direction": d.number, "finding": d.finding, "claim": d.claim, "low": d.low, "high": d.high,
               "paper": d.paper, "source": d.source}
        try:
            if df.empty:
                raise NotMeasured("no finished trials")
            c = d.compare(df)
            a, b = c.a[d.metric].dropna(), c.b[d.metric].dropna()
            row.update(compared=c.compared, n_a=len(a), n_b=len(b), matched_on=c.matched_on, note=c.note)
            if len(a) < 2 or len(b) < 2:
                raise NotMeasured(f"{c.compared} matched on {c.matched_on}: {len(a)} and {len(b)} trials (needs 2 "
                                  "a side)")
            effect, how = effect_of(c.a, c.b, d.metric, c.on)
            if how:
                row["matched_on"] += f", {how}"
            row.update(effect=effect.value, effect_ci_low=effect.low, effect_ci_high=effect.high,
                       verdict=DOES_NOT_HOLD if c.fails else verdict(d, effect))
        except NotMeasured as e:
            row.update(verdict=NOT_MEASURED, note=str(e))
        rows.append(row)
    out = pd.DataFrame(rows)
    out = out.reindex(columns=[*out.columns, *(c for c in SHOWN if c not in out)])
    for column in ("compared", "matched_on", "note"):  # text columns: empty, not NaN (a float column otherwise)
        out[column] = out[column].astype(object).where(out[column].notna(), "")
    return out.astype({"n_a": "Int64", "n_b": "Int64"})


# --- the report ---

def trial_counts(trials: pd.DataFrame, experiments: list[str]) -> pd.DataFrame:
    """Per experiment: runs, finished trials, configurations and seeds (distinct; and per configuration), and
    `smoke` ("yes" where a study ran with `--smoke`; the column only where one did)."""
    rows = []
    for name in experiments:
        runs = trials[trials["experiment"] == name] if "experiment" in trials else trials.iloc[0:0]
        done = tables.finished(runs)
        per = tables.over_seeds(runs)["seeds"] if len(done) else pd.Series(dtype=float)
        rows.append({"experiment": name, "runs": len(runs), "finished": len(done), "configurations": len(per),
                     "seeds": done["seed"].nunique() if "seed" in done else (1 if len(done) else 0),
                     "seeds_per_configuration": "-" if per.empty else
                     f"{per.min():.0f}" + (f"-{per.max():.0f}" if per.max() > per.min() else ""),
                     "smoke": "yes" if "smoke" in runs and runs["smoke"].eq(True).any() else ""})
    out = pd.DataFrame(rows)
    return out if out["smoke"].astype(bool).any() else out.drop(columns="smoke")


def frontier_pngs(experiments: list[str]) -> dict[str, str]:
    """{experiment: report-frontier-<its name as a file name>.png}; two names that read alike as files ("x y",
    "x_y") get their position in the list added, so each keeps its own plot."""
    names = [default_out(e).name for e in experiments]
    return {e: f"report-frontier-{name}{f'-{i + 1}' if names.count(name) > 1 else ''}.png"
            for i, (e, name) in enumerate(zip(experiments, names))}


def shown_command(argv: list[str]) -> str:
    """The command as run, with a tracking URI's user info (a password, a token) left out."""
    return "python -m analysis.report " + shlex.join(re.sub(r"//[^/@]*@", "//***@", a) for a in argv)


def smoke_warning(counts: pd.DataFrame) -> list[str]:
    """A line for the report where an experiment's study ran with `--smoke` (its counts' `smoke` column)."""
    if "smoke" not in counts:
        return []
    names = ", ".join(counts.loc[counts["smoke"] == "yes", "experiment"])
    return [f"**Smoke checks: {names}** ran with `--smoke`, the smallest budget (a check that every step runs, "
            "not a result): their verdicts say nothing about the papers.\n"]


def markdown(effects: pd.DataFrame, counts: pd.DataFrame, command: str, frontiers: dict[str, str],
             notes: str = "") -> str:
    lines = ["# Do the papers' directions hold here?\n", f"Made by `{command}`.\n", "## Trials\n",
             "Finished trials count; a configuration is every param but the seed.\n", *smoke_warning(counts),
             tables.to_markdown(counts),
             "## Directions\n",
             "Effect = A's score over B's (`compared`), in score points (0-100), with its 95% interval. One trial "
             "is one seed of one configuration, and the seed, not the trial, is the independent unit: every "
             "configuration at a seed shares its data order. Where trials of A have their twin in B at the same "
             "seed (`matched_on` ends in \"paired by seed (k seeds)\"): the mean over seeds of each seed's mean "
             "twin difference with the paired t interval over the k seeds (trials without a twin left out); else "
             "mean of A - mean of B with Welch's interval over the seeds' means (\"over seeds' means\" where a "
             "seed has several configurations) or over the trials where a group has one seed. `n_a`, `n_b`: the "
             "groups' trials. `claim`: the effect the paper's "
             "finding allows. Verdicts: **holds** (the whole interval within the claim), **not resolved** (the "
             "interval reaches both inside and outside the claim), **does not hold** (the whole interval outside), "
             "**not measured** "
             "(a group has fewer than 2 trials). `matched_on`: what each trial of A shares with some trial of B.\n",
             tables.to_markdown(effects[SHOWN]), f"![Each direction's effect with its 95% interval]({FOREST})\n",
             "## What the papers found\n"]
    lines += [f"{r.direction}. {r.paper} ({r.source}). Here: **{r.verdict}**." for r in effects.itertuples()]
    lines.append("")
    if frontiers:
        lines.append("## Frontiers\n")
        lines += [f"![{name}: score vs GPU-hours]({png})\n" for name, png in frontiers.items()]
    if notes.strip():
        lines += ["## Notes\n", notes.strip() + "\n"]
    lines.append("## Sources\n")
    lines += ["- Lu et al. 2023, \"An Empirical Study of Scaling Instruct-Tuned Large Multimodal Models\" "
              "(directions 1-6).",
              "- Luo et al. 2023, \"Cheap and Quick: Efficient Vision-Language Instruction Tuning for Large Language "
              "Models\" (LaVIN; direction 7).", ""]
    return "\n".join(lines)


def outputs(experiments: list[str]) -> tuple[str, ...]:
    return (REPORT, FOREST, *frontier_pngs(experiments).values())


def write_report(trials: pd.DataFrame, experiments: list[str], out_dir: str | Path, command: str,
                 force: bool = False, notes: str = "") -> pd.DataFrame:
    """REPORT.md and its plots in out_dir (check_out's rule: nothing this module did not write is
    replaced unless `force`), with `notes` (markdown: what the studies tried, why a direction does not
    hold) as its "Notes" section; returns `assess`'s table. Raises AnalysisError when no trial finished."""
    out = check_out(out_dir, force, outputs(experiments), WRITTEN, "analysis.report")
    if tables.finished(trials).empty:
        raise AnalysisError(f"no finished trials with a score in {', '.join(map(repr, experiments))}")
    effects = assess(trials)
    out.mkdir(parents=True, exist_ok=True)
    plots.effects_plot(effects).savefig(out / FOREST, dpi=150)
    frontiers = {}
    for name in experiments:
        try:
            front = frontier(trials[trials["experiment"] == name])
        except AnalysisError:
            continue  # nothing finished with a cost there: the counts table says so
        png = frontier_pngs(experiments)[name]
        plots.frontier_plot(front, title=name).savefig(out / png, dpi=150)
        frontiers[name] = png
    (out / REPORT).write_text(markdown(effects, trial_counts(trials, experiments), command, frontiers, notes))
    record_written(out, (REPORT, FOREST, *frontiers.values()), WRITTEN)
    return effects


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = OneLineParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", action="append", required=True,
                   help="an MLflow experiment (a study's name); repeat for several, their trials are pooled")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--out", default="report", help="folder of REPORT.md and its plots (default report/ in the "
                   "working directory; this project's docs/REPORT.md was written with --out docs --force)")
    p.add_argument("--force", action="store_true", help="replace REPORT.md and its plots even if this command "
                   "did not write them")
    p.add_argument("--notes", help="a markdown file whose text becomes the report's Notes section (what the "
                   "studies tried, why a direction does not hold)")
    return p.parse_args(argv)


def read_notes(path: str | None) -> str:
    """The --notes file's text ("" for none); BadInput naming the file when it cannot be read as UTF-8 text."""
    if path is None:
        return ""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"--notes {path}: no such file") from None
    except IsADirectoryError:
        raise BadInput(f"--notes {path}: is a directory, not a markdown file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--notes {path}: cannot be read as UTF-8 text ({type(e).__name__})") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        args.experiment = list(dict.fromkeys(args.experiment))  # each once
        notes = read_notes(args.notes)
        check_out(args.out, args.force, outputs(args.experiment), WRITTEN, "analysis.report")  # before reading
        trials = load_studies(args.tracking_uri, args.experiment)
        effects = write_report(trials, args.experiment, args.out, shown_command(argv), args.force, notes)
    except (BadInput, AnalysisError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(formatted(effects[SHOWN]).to_string(index=False))
    print(f"\nwrote {Path(args.out) / REPORT} and its plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
