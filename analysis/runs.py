"""An experiment's trial runs as a pandas DataFrame, and the study's cost table.

    from analysis.runs import load_trials
    df = load_trials("sqlite:////abs/mlflow.db", "lora")

One row per nested trial run (a run with an `mlflow.parentRunId` tag; the study's own
parent run is left out): `run_id`, `status` (FINISHED, FAILED, KILLED, RUNNING, ...),
`parent_run_id`, `study`, `experiment`, `run_name` (the trial's name: what varies, e.g.
"1m r8 a32 lr3.5e-3"), `stopped_early` (the stage-2 step at which an early-stopping
scheduler stopped the trial; NaN for the others; only when some trial was stopped), `smoke`
(whether its study ran with `--smoke`: the smallest budget, a check and not a result), the
flat params with their types restored from TrialConfig (`lora_rank` is an int, `lr` a
float, `model_size` stays a string), and the final (last-step) value of every metric.
Any tracking URI MLflow accepts works:
a sqlite file, a file store directory, or `http://host:port` of a tracking server.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from tracking.metrics import METRICS
from tracking.store import STUDY_TAG, all_runs, resolve_uri, where
from trainables.config import parse_param

COST_COLUMNS = ["gpu_hours", "dollars", "trainable_params", "peak_mem_gb", "artifact_mb", "samples_per_s"]
TABLE_COLUMNS = ["model_size", "method", "lora_rank", "lora_alpha", "lr", "score"] + COST_COLUMNS
# Shown after the fixed columns when a study varies them (the resolution and data-mixing axes) or logs them.
VARYING_COLUMNS = ["image_size", "mix_ratio", "adapter_dim", "router_temperature"]
EXTRA_SCORES = ["text_score"]
RUN_COLUMNS = ["run_id", "status", "parent_run_id", "study", "experiment", "run_name"]
# The tag a trial's run gets when an early-stopping scheduler stopped it (value: the stage-2 step it reached);
# study.mlflow_runs writes it, and the frontier leaves such trials out unless asked (analysis.pareto).
STOPPED_TAG = "stopped_early"
# Measured cost over the forecast made before the trial ran (tables.forecast_vs_measured).
RATIOS = {"gpu_hours_ratio": ("forecast_gpu_hours", "gpu_hours"), "dollars_ratio": ("forecast_dollars", "dollars")}

# How each column reads in a table: metrics as tracking.metrics says (tiny costs in scientific
# notation, counts with separators), the params and the tables' aggregates of a score here.
FORMATS = {**{name: m.fmt for name, m in METRICS.items()},
           "lr": "{:.2e}", "lora_rank": "{:.0f}", "image_size": "{:.0f}", "lora_alpha": "{:g}",
           "alpha_per_rank": "{:g}", "mix_ratio": "{:g}",
           "score_best": "{:.1f}", "score_mean": "{:.1f}", "score_std": "{:.1f}", "stopped_early": "{:.0f}",
           "seeds": "{:.0f}", "effect": "{:+.1f}",
           **{ratio: "{:.2f}" for ratio in RATIOS}}
# A 95% interval's ends (`score_ci_low`, `score_ci_high`) read like the metric they bound.
INTERVAL_ENDS = ("_ci_low", "_ci_high")


class AnalysisError(KeyError):
    """Bad input to the analysis: an unknown experiment or column, or nothing to analyse.

    The message names the culprit. A KeyError so that older callers that caught the
    unknown-experiment KeyError keep working.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def load_trials(tracking_uri: str | None, experiment: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """Every trial run of `experiment` (only those of one study's parent run if `parent_run_id`)."""
    uri = resolve_uri(tracking_uri)
    _require_local_store(uri)
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except MlflowException as e:  # e.g. a web server that is not MLflow's: 404 on MLflow's REST API
        raise AnalysisError(f"tracking URI {uri} does not answer as an MLflow tracking store: "
                            f"{str(e).splitlines()[0][:200]}") from None
    if exp is None:
        raise AnalysisError(f"no MLflow experiment named {experiment!r} at {uri}")
    query, matches = where({f"tags.`{MLFLOW_PARENT_RUN_ID}`": parent_run_id}) if parent_run_id else ("", None)
    rows, smoke = [], {}
    for run in all_runs(client, exp.experiment_id, query):
        if matches is not None and not matches(run):
            continue
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        if parent is None:  # the study's own run: only whether it ran with --smoke
            smoke[run.info.run_id] = run.data.params.get("smoke") == "True"
            continue
        row = {"run_id": run.info.run_id, "status": run.info.status, "parent_run_id": parent,
               "study": run.data.tags.get(STUDY_TAG, experiment), "experiment": experiment,
               "run_name": run.info.run_name}
        if STOPPED_TAG in run.data.tags:  # the step, as a number where it is one
            step = run.data.tags[STOPPED_TAG]
            row[STOPPED_TAG] = float(step) if step.strip().lstrip("-").isdigit() else step
        row.update({k: parse_param(k, v) for k, v in run.data.params.items()})
        row.update(run.data.metrics)
        rows.append(row)
    for parent in {r["parent_run_id"] for r in rows} - smoke.keys():  # not in this query (a parent_run_id filter)
        smoke[parent] = _smoke(client, parent)
    for row in rows:  # the study's `--smoke` (study.plan.Plan's params): the smallest budget, not a result
        row["smoke"] = smoke[row["parent_run_id"]]
    return pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS)


def _smoke(client: MlflowClient, parent_run_id: str) -> bool:
    """Whether the study run `parent_run_id` ran with `--smoke` (its `smoke` param); False where it is gone."""
    try:
        return client.get_run(parent_run_id).data.params.get("smoke") == "True"
    except MlflowException:
        return False


def _require_local_store(uri: str) -> None:
    """Reading must not create: MLflow would make an empty store at a mistyped local path; and a server must
    answer (MLflow's client retries a dead one for minutes)."""
    from tracking.store import server_problem

    if (problem := server_problem(uri)) is not None:
        raise AnalysisError(f"{problem} (tracking URI {uri})")
    local = {"sqlite:///": uri[len("sqlite:///"):], "file://": uri[len("file://"):]}
    for scheme, path in local.items():
        if uri.startswith(scheme) and not Path(unquote(path)).exists():
            raise AnalysisError(f"no MLflow store at {unquote(path)} (tracking URI {uri})")
    if uri.startswith("file://"):  # MLflow 3 keeps its file store in maintenance mode and raises on opening one
        raise AnalysisError(f"{unquote(uri[len('file://'):])} is a folder (MLflow's file store), which this MLflow "
                            f"does not read: pass an SQLite store, e.g. sqlite:///PATH/mlflow.db (tracking URI {uri})")
    if uri.startswith("sqlite:///"):  # MLflow would write its schema into an empty file, or retry a folder
        path = Path(unquote(uri[len("sqlite:///"):]))
        if not path.is_file():
            raise AnalysisError(f"{path} is not a file: not an MLflow store (tracking URI {uri})")
        with path.open("rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                kind = "empty" if path.stat().st_size == 0 else "another kind of file"
                raise AnalysisError(f"{path} is not an SQLite database ({kind}): not an MLflow store "
                                    f"(tracking URI {uri})")
        import sqlite3

        with sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True) as db:  # read-only: MLflow would
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"experiments", "runs"} <= tables:  # ... write its schema into another program's database
            raise AnalysisError(f"{path} is an SQLite database without MLflow's tables: not an MLflow store "
                                f"(tracking URI {uri})")


def load_studies(tracking_uri: str | None, experiments: list[str]) -> pd.DataFrame:
    """The trials of several experiments in one frame (its `experiment` column tells them apart)."""
    if not experiments:
        raise AnalysisError("no experiments named to compare")
    frames = [load_trials(tracking_uri, name) for name in experiments]
    return pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True)


def column_format(column: str) -> str | None:
    """How a column's values read ("{:.1f}"), or None for a column shown as it is."""
    if column in FORMATS:
        return FORMATS[column]
    end = next((e for e in INTERVAL_ENDS if column.endswith(e)), None)
    return FORMATS.get(column[:-len(end)]) if end else None


def formatted(view: pd.DataFrame) -> pd.DataFrame:
    """The same frame with every known numeric column as display strings ("-" where missing)."""
    view = view.copy()
    for col in view.columns:
        spec = column_format(col)
        if spec is not None:
            view[col] = view[col].map(lambda v, spec=spec: _format(spec, v))
    return view.astype(object).where(view.notna(), "-")


def _format(spec: str, value) -> str:
    if not isinstance(value, str) and pd.isna(value):
        return "-"
    try:
        return spec.format(value)
    except (TypeError, ValueError):  # not a number after all (a tag written by hand): as it is
        return str(value)


def scores_of(df: pd.DataFrame) -> list[str]:
    """The score columns a table shows after `score` when the trials logged them: `text_score`, and a
    95% interval's ends (`score_ci_low`, `score_ci_high`, ...) where the evaluation logs one."""
    present = [c for c in ["score"] + EXTRA_SCORES if c in df.columns and df[c].notna().any()]
    out = []
    for col in present:
        out += [c for c in [col, *(col + end for end in INTERVAL_ENDS)]
                if c in df.columns and df[c].notna().any()]
    return [c for c in out if c != "score"]


def not_applicable_blanked(df: pd.DataFrame) -> pd.DataFrame:
    """Params a trial's method does not read left blank (NaN): runs log only the params that apply, but a
    store written by an older version holds leftovers such as `lora_rank` on a full run (the method
    registry says which field is whose)."""
    from trainables.methods import METHODS, method_fields

    if "method" not in df or df.empty:
        return df
    df = df.copy()
    for col in sorted(method_fields() | {"alpha_per_rank"}):
        if col not in df:
            continue
        owner = "lora_alpha" if col == "alpha_per_rank" else col
        applies = df["method"].map(lambda m: m in METHODS and owner in METHODS[m].fields)
        df[col] = df[col].mask(~applies.astype(bool))
    return df


def format_table(df: pd.DataFrame, sort_by: str = "score") -> str:
    """Trials sorted by score with their cost columns, as aligned text."""
    if df.empty:
        return "(no trials)"
    cols = [c for c in TABLE_COLUMNS if c in df.columns]
    varying = [c for c in VARYING_COLUMNS if c in df.columns and df[c].nunique(dropna=True) > 1]
    at = cols.index("score") + 1 if "score" in cols else len(cols)
    cols[at:at] = scores_of(df)
    cols = cols[:2] + varying + cols[2:]
    df = not_applicable_blanked(df)
    view = df.sort_values(sort_by, ascending=False, na_position="last")[cols] \
        if sort_by in df.columns else df[cols]
    return formatted(view).to_string(index=False)
