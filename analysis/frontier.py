"""A study's cost-performance frontier: the table on the terminal, frontier.csv, frontier.png, table.md.

    python -m analysis.frontier --experiment lora [--tracking-uri URI] [--x gpu_hours] [--y score]
        [--out DIR] [--price PER_NODE_HOUR]

`--x` is any cost to minimise (gpu_hours, dollars, trainable_params, peak_mem_gb,
artifact_mb), `--y` the score to maximise. `--price` recomputes `dollars` from
`gpu_hours` at another price per node-hour. DIR (default: the working directory)
receives frontier.csv (one row per trial: run_id, params, metrics, `on_frontier`,
and `excluded`: why a trial took no part), frontier.png and table.md.
Exit 0 on success, 2 on bad input (one `error:` line naming the experiment / column /
flag), 1 otherwise.

A study calls `log_study_frontier(tracking_uri, experiment, parent_run_id, out_dir)` at
its end: the same files for that study's trials, logged under `frontier/` in its parent run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis import plots, tables
from analysis.pareto import Frontier, frontier, require_columns
from analysis.runs import RUN_COLUMNS, TABLE_COLUMNS, AnalysisError, formatted, load_trials
from trainables.config import TrialConfig


def reprice(trials: pd.DataFrame, price_per_node_hour: float) -> pd.DataFrame:
    """`dollars` recomputed as gpu_hours x price (the cost convention of trainables.worker.cost),
    and the `price_per_node_hour` param set to match, so the CSV does not contradict itself."""
    require_columns(trials, ["gpu_hours"])
    return trials.assign(dollars=trials["gpu_hours"] * price_per_node_hour, price_per_node_hour=price_per_node_hour)


def csv_columns(df: pd.DataFrame) -> list[str]:
    """Run identity first, then the verdict, the params in schema order, and the metrics by name."""
    first = [c for c in RUN_COLUMNS + ["on_frontier", "excluded"] if c in df]
    params = [f for f in TrialConfig.__dataclass_fields__ if f in df and f not in first]
    return first + params + sorted(c for c in df.columns if c not in first and c not in params)


def frontier_table(front: Frontier) -> pd.DataFrame:
    """The frontier's trials, cheapest first, with the study table's columns and every objective."""
    on = front.frontier
    cols = [c for c in TABLE_COLUMNS if c in on]
    cols += [c for c in front.objectives if c not in cols] + ["run_id"]
    return tables.tidy(on)[cols].reset_index(drop=True)


def report_markdown(front: Frontier, title: str) -> str:
    sections = [f"# {title}\n", front.summary() + "\n",
                "## Frontier (cheapest first)\n", tables.to_markdown(frontier_table(front)),
                "## Score and cost by model size x method x LoRA rank\n",
                "Costs are means over each row's trials.\n", tables.to_markdown(tables.by_size_method(front.trials)),
                "## Effect of each factor\n", tables.to_markdown(tables.factor_effects(front.trials))]
    return "\n".join(sections)


def write_report(trials: pd.DataFrame, out_dir: str | Path, x: str = "gpu_hours", y: str = "score",
                 title: str | None = None) -> Frontier:
    """frontier.csv, frontier.png and table.md for these trials in out_dir; the Frontier they show.

    Raises AnalysisError for an unknown column or when no trial finished with both metrics.
    """
    front = frontier(trials, y=y, x=x)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    front.trials[csv_columns(front.trials)].to_csv(out / "frontier.csv", index=False)
    studies = sorted(trials["study"].dropna().unique()) if "study" in trials else []
    name = ", ".join(map(str, studies)) or "study"
    fig = plots.frontier_plot(front, x=x, y=y, title=title or name)
    fig.savefig(out / "frontier.png", dpi=150)
    (out / "table.md").write_text(report_markdown(front, f"{title or name}: {y} vs {x}"))
    return front


def log_study_frontier(tracking_uri: str | None, experiment: str, parent_run_id: str, out_dir: str | Path,
                       *, x: str = "gpu_hours", y: str = "score") -> Path:
    """The frontier of one study's trials (the nested runs of `parent_run_id`), written to out_dir
    and logged as the parent run's artifacts under `frontier/`; returns out_dir.

    Raises AnalysisError when the experiment is unknown or none of the study's trials finished.
    """
    from mlflow.tracking import MlflowClient

    from tracking.store import resolve_uri

    trials = load_trials(tracking_uri, experiment, parent_run_id=parent_run_id)
    out = Path(out_dir)
    write_report(trials, out, x=x, y=y)
    MlflowClient(resolve_uri(tracking_uri)).log_artifacts(parent_run_id, str(out), "frontier")
    return out


class _BadInput(Exception):
    """Reported as one `error:` line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we promise one line
        raise _BadInput(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m analysis.frontier", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment (the study's name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--x", default="gpu_hours", help="cost to minimise (default gpu_hours)")
    p.add_argument("--y", default="score", help="score to maximise (default score)")
    p.add_argument("--out", default=".", help="output directory (default: the working directory)")
    p.add_argument("--price", type=float, help="dollars per node-hour: recompute `dollars` from gpu_hours")
    args = p.parse_args(argv)
    if args.price is not None and not args.price >= 0:
        raise _BadInput(f"--price must be a non-negative number of dollars per node-hour, got {args.price}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        trials = load_trials(args.tracking_uri, args.experiment)
        if args.price is not None:
            trials = reprice(trials, args.price)
        front = write_report(trials, args.out, x=args.x, y=args.y, title=args.experiment)
    except (_BadInput, AnalysisError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(front.summary())
    print(f"\nFrontier of {args.y} against {args.x} (cheapest first):")
    print(formatted(frontier_table(front)).to_string(index=False))
    print("\nBy model size x method x LoRA rank (costs: means over the row's trials):")
    print(tables.to_text(tables.by_size_method(front.trials)))
    print("\nEffect of each factor:")
    print(tables.to_text(tables.factor_effects(front.trials)))
    out = Path(args.out)
    print(f"\nwrote {out / 'frontier.csv'}, {out / 'frontier.png'}, {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
