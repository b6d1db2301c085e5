"""A study's cost-performance frontier: the table on the terminal, frontier.csv, frontier.png, table.md.

    python -m analysis.frontier --experiment lora [--tracking-uri URI] [--x gpu_hours] [--y score]
        [--out DIR] [--force] [--price PER_NODE_HOUR] [--dollars-axis] [--include-stopped]

`--x` is any cost to minimise (gpu_hours, dollars, trainable_params, peak_mem_gb,
artifact_mb), `--y` the score to maximise. `--price` recomputes `dollars` from
`gpu_hours` at another price per node-hour; `--dollars-axis` adds a dollars axis on top
of a GPU-hours plot (at `--price`, else the trials' own price). `--include-stopped` lets
trials an early-stopping scheduler stopped take part (left out and counted by default).
DIR (default: `frontier/<experiment>/` under the working directory) receives
frontier.csv (one row per trial: run_id, params, metrics, `on_frontier`, and
`excluded`: why a trial took no part), frontier.png and table.md. A study run at
several seeds has one row per configuration instead (its seeds' means, `seeds`, and its
runs in `run_id` as "id1,id2"; analysis.pareto), plus one per trial left out. Where the
score has a 95% interval, `contender` marks the points no cheaper-or-equal point beats
significantly; the table lists them beside the frontier and the plot draws error bars.
Files there that this command did not write (or that changed since it did) are never
replaced unless `--force`.
Exit 0 on success, 2 on bad input (one `error:` line naming the experiment / column /
flag / file), 1 otherwise.

A study calls `log_study_frontier(tracking_uri, experiment, parent_run_id, out_dir)` at
its end: the same files for that study's trials, logged under `frontier/` in its parent run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import pandas as pd

from analysis import plots, tables
from analysis.pareto import Frontier, frontier, require_columns
from analysis.runs import (RUN_COLUMNS, STOPPED_TAG, TABLE_COLUMNS, VARYING_COLUMNS, AnalysisError, formatted,
                           load_trials, scores_of)
from trainables.config import TrialConfig

OUTPUTS = ("frontier.csv", "frontier.png", "table.md")
# What this module wrote in a folder, with each file's SHA-256 then: a file is replaced only if it is still
# what we wrote (an edited table.md is the user's now).
WRITTEN = ".analysis-frontier.json"


def reprice(trials: pd.DataFrame, price_per_node_hour: float) -> pd.DataFrame:
    """`dollars` recomputed as gpu_hours x price (the cost convention of trainables.worker.cost),
    and the `price_per_node_hour` param set to match, so the CSV does not contradict itself."""
    require_columns(trials, ["gpu_hours"])
    return trials.assign(dollars=trials["gpu_hours"] * price_per_node_hour, price_per_node_hour=price_per_node_hour)


def csv_columns(df: pd.DataFrame) -> list[str]:
    """Run identity first, then the verdict, the params in schema order, and the metrics by name."""
    first = [c for c in RUN_COLUMNS + ["seeds", "on_frontier", "contender", "excluded"] if c in df]
    params = [f for f in TrialConfig.__dataclass_fields__ if f in df and f not in first]
    return first + params + sorted(c for c in df.columns if c not in first and c not in params)


def frontier_table(front: Frontier, contenders: bool = False) -> pd.DataFrame:
    """The frontier's trials, cheapest first: the trial's name, the study table's columns (the axes the
    study varied, `text_score` and a score's interval where logged), every objective, the step an
    early-stopped trial reached (when such trials take part) and the run id. Configurations (a study run
    at several seeds, analysis.pareto) say how many `seeds` they average.

    `contenders`: also the points off the frontier that no point significantly dominates (`contender`,
    analysis.pareto), with `on_frontier` and `contender` columns to tell them apart."""
    on = front.frontier
    if contenders and "contender" in front.trials:
        keep = front.trials["on_frontier"] | front.trials["contender"].fillna(False).astype(bool)
        on = front.in_order(front.trials[keep])
    cols = [c for c in TABLE_COLUMNS if c in on]
    varying = [c for c in VARYING_COLUMNS if c in front.trials and front.trials[c].nunique(dropna=True) > 1]
    cols = cols[:2] + varying + cols[2:]
    at = cols.index("score") + 1 if "score" in cols else len(cols)
    cols[at:at] = [c for c in scores_of(on) if c not in cols]
    cols += [c for c in front.objectives if c not in cols]
    if front.over_seeds:
        cols.insert(cols.index("score") if "score" in cols else len(cols), "seeds")
    if contenders and "contender" in on:
        cols += ["on_frontier", "contender"]
    if STOPPED_TAG in on and on[STOPPED_TAG].notna().any():
        cols.append(STOPPED_TAG)
    first = ["run_name"] if "run_name" in on and on["run_name"].notna().any() else []
    return tables.tidy(on)[first + cols + ["run_id"]].reset_index(drop=True)


def report_markdown(front: Frontier, title: str, trials: pd.DataFrame | None = None) -> str:
    """table.md: the frontier, then the tables by size x method and by factor of `trials` (default: the
    frontier's own rows, which are configurations, not trials, when the study has several seeds)."""
    trials = front.trials if trials is None else trials
    sections = [f"# {title}\n", front.summary() + "\n", "## Frontier (cheapest first)\n"]
    if front.over_seeds:
        sections.append("Each point is a configuration: its metrics are means over its seeds, its score's interval "
                        "the 95% t interval over them.\n")
    if "contender" in front.trials:
        sections.append(f"Beside the frontier, the points off it that no point costing no more beats significantly "
                        f"(its 95% interval of {next(iter(front.objectives))} wholly above theirs): "
                        "`contender` = True.\n")
    sections += [tables.to_markdown(frontier_table(front, contenders=True)),
                "## Score and cost by model size x method x LoRA rank\n",
                "Costs are means over each row's trials.\n", tables.to_markdown(tables.by_size_method(trials)),
                "## Effect of each factor\n", tables.to_markdown(tables.factor_effects(trials),
                                                                   "no factor of the table (" + ", ".join(tables.FACTORS)
                                                                   + ") took two values among the finished trials")]
    forecast = tables.forecast_vs_measured(trials)
    if not forecast.empty:
        sections += ["## Forecast vs measured cost per trial\n",
                     "The cost forecast before each trial ran (training FLOPs / the device's sustained FLOP/s) "
                     "against what it measured; ratio = measured / forecast.\n", tables.to_markdown(forecast)]
    return "\n".join(sections)


def default_out(experiment: str) -> Path:
    """`frontier/<experiment>/` under the working directory: a folder of its own per experiment."""
    return Path("frontier") / (re.sub(r"[^\w.-]+", "_", experiment).strip("._") or "experiment")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _written(out: Path, record: str = WRITTEN) -> dict[str, str]:
    try:
        recorded = json.loads((out / record).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def check_out(out_dir: str | Path, force: bool = False, outputs: tuple[str, ...] = OUTPUTS, record: str = WRITTEN,
              writer: str = "analysis.frontier") -> Path:
    """The report's folder, checked before anything is computed or written: not a file, and none of
    `outputs` (frontier.csv / frontier.png / table.md) there unless `writer` wrote it (its `record` says so)
    and it has not changed since (`force` replaces them all the same). Raises AnalysisError naming the file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out}: is a file; give a folder (created if absent)")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise AnalysisError(f"--out {out}: {above} is a file, so the folder cannot be created there")
    if force or not out.exists():
        return out
    ours = _written(out, record)
    for name in outputs:
        path = out / name
        if path.exists() and ours.get(name) != _digest(path):
            raise AnalysisError(f"--out {out}: {name} is there and was not written by {writer} (or changed "
                                "since); pass --force to replace it, or choose another --out")
    return out


def record_written(out: Path, outputs: tuple[str, ...] = OUTPUTS, record: str = WRITTEN) -> None:
    """Note what was just written in `out` (each file's SHA-256), for `check_out` next time; what an earlier
    run wrote there stays noted (a report over other experiments wrote other plots)."""
    noted = {**_written(out, record), **{n: _digest(out / n) for n in outputs}}
    (out / record).write_text(json.dumps(noted, indent=1))


def write_report(trials: pd.DataFrame, out_dir: str | Path, x: str = "gpu_hours", y: str = "score",
                 title: str | None = None, *, include_stopped: bool = False, price: float | None = None,
                 force: bool = False) -> Frontier:
    """frontier.csv, frontier.png and table.md for these trials in out_dir; the Frontier they show.

    `price` (dollars per node-hour) adds a dollars axis to a GPU-hours plot; `include_stopped` see
    analysis.pareto.frontier. Files in out_dir that this module did not write are not replaced unless
    `force` (check_out). Raises AnalysisError for an unknown column, a file in the way, or when no trial
    finished with both metrics.
    """
    out = check_out(out_dir, force)
    front = frontier(trials, y=y, x=x, include_stopped=include_stopped)
    out.mkdir(parents=True, exist_ok=True)
    front.trials[csv_columns(front.trials)].to_csv(out / "frontier.csv", index=False)
    studies = sorted(trials["study"].dropna().unique()) if "study" in trials else []
    name = ", ".join(map(str, studies)) or "study"
    fig = plots.frontier_plot(front, x=x, y=y, title=title or name, price=price)
    fig.savefig(out / "frontier.png", dpi=150)
    (out / "table.md").write_text(report_markdown(front, f"{title or name}: {y} vs {x}", trials))
    record_written(out)
    return front


def log_study_frontier(tracking_uri: str | None, experiment: str, parent_run_id: str, out_dir: str | Path,
                       *, x: str = "gpu_hours", y: str = "score") -> Frontier:
    """The frontier of one study's trials (the nested runs of `parent_run_id`), written to out_dir
    (with a dollars axis at the trials' price) and logged as the parent run's artifacts under
    `frontier/`; returns the Frontier.

    Raises AnalysisError when the experiment is unknown or none of the study's trials finished.
    """
    from mlflow.tracking import MlflowClient

    from tracking.store import resolve_uri

    trials = load_trials(tracking_uri, experiment, parent_run_id=parent_run_id)
    out = Path(out_dir)
    front = write_report(trials, out, x=x, y=y, price=plots.price_of(trials))
    client = MlflowClient(resolve_uri(tracking_uri))
    for name in OUTPUTS:  # not the record of what was written: it is about this folder, not the run
        client.log_artifact(parent_run_id, str(out / name), "frontier")
    return front


class BadInput(Exception):
    """Reported as one `error:` line and exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we promise one line
        raise BadInput(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m analysis.frontier", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment (the study's name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--x", default="gpu_hours", help="cost to minimise (default gpu_hours)")
    p.add_argument("--y", default="score", help="score to maximise (default score)")
    p.add_argument("--out", help="output directory (default: frontier/<experiment>/ in the working directory)")
    p.add_argument("--force", action="store_true",
                   help="replace frontier.csv / frontier.png / table.md in --out even if this command did not write them")
    p.add_argument("--price", type=float, help="dollars per node-hour: recompute `dollars` from gpu_hours")
    p.add_argument("--dollars-axis", action="store_true",
                   help="a dollars axis on top of a gpu_hours plot (at --price, else the trials' price)")
    p.add_argument("--include-stopped", action="store_true",
                   help="let trials an early-stopping scheduler stopped take part (default: left out and counted)")
    args = p.parse_args(argv)
    if args.price is not None and not args.price >= 0:
        raise BadInput(f"--price must be a non-negative number of dollars per node-hour, got {args.price}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        out = check_out(args.out if args.out is not None else default_out(args.experiment), args.force)
        trials = load_trials(args.tracking_uri, args.experiment)
        if args.price is not None:
            trials = reprice(trials, args.price)
        price = plots.price_of(trials) if args.dollars_axis else None
        if args.dollars_axis and price is None:
            raise BadInput("--dollars-axis: the trials were costed at several prices per node-hour (or none); "
                            "pass --price")
        front = write_report(trials, out, x=args.x, y=args.y, title=args.experiment,
                             include_stopped=args.include_stopped, price=price, force=args.force)
    except (BadInput, AnalysisError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(front.summary())
    print(f"\nFrontier of {args.y} against {args.x} (cheapest first"
          + ("; with the contenders off it: not significantly dominated" if "contender" in front.trials else "") + "):")
    print(formatted(frontier_table(front, contenders=True)).to_string(index=False))
    print("\nBy model size x method x LoRA rank (costs: means over the row's trials):")
    print(tables.to_text(tables.by_size_method(trials)))
    print("\nEffect of each factor:")
    print(tables.to_text(tables.factor_effects(trials)))
    forecast = tables.forecast_vs_measured(trials)
    if not forecast.empty:
        print("\nForecast vs measured cost per trial (ratio = measured / forecast):")
        print(tables.to_text(forecast))
    print(f"\nwrote {out / 'frontier.csv'}, {out / 'frontier.png'}, {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
