"""An experiment's trial runs as a pandas DataFrame, and the study's cost table.

    from analysis.runs import load_trials
    df = load_trials("sqlite:////abs/mlflow.db", "lora")

One row per nested trial run (a run with an `mlflow.parentRunId` tag; the study's own
parent run is left out): `run_id`, `status` (FINISHED, FAILED, KILLED, RUNNING, ...),
`parent_run_id`, `study`, `experiment`, the flat params with their types restored from
TrialConfig (`lora_rank` is an int, `lr` a float, `model_size` stays a string), and
the final (last-step) value of every metric. Any tracking URI MLflow accepts works:
a sqlite file, a file store directory, or `http://host:port` of a tracking server.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pandas as pd
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
RUN_COLUMNS = ["run_id", "status", "parent_run_id", "study", "experiment"]

# How each column reads in a table: metrics as tracking.metrics says (tiny costs in scientific
# notation, counts with separators), the params and the tables' aggregates of a score here.
FORMATS = {**{name: m.fmt for name, m in METRICS.items()},
           "lr": "{:.2e}", "lora_alpha": "{:g}", "alpha_per_rank": "{:g}", "mix_ratio": "{:g}",
           "score_best": "{:.1f}", "score_mean": "{:.1f}", "score_std": "{:.1f}"}


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
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise AnalysisError(f"no MLflow experiment named {experiment!r} at {uri}")
    query, matches = where({f"tags.`{MLFLOW_PARENT_RUN_ID}`": parent_run_id}) if parent_run_id else ("", None)
    rows = []
    for run in all_runs(client, exp.experiment_id, query):
        if matches is not None and not matches(run):
            continue
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        if parent is None:
            continue  # the study's own run
        row = {"run_id": run.info.run_id, "status": run.info.status, "parent_run_id": parent,
               "study": run.data.tags.get(STUDY_TAG, experiment), "experiment": experiment}
        row.update({k: parse_param(k, v) for k, v in run.data.params.items()})
        row.update(run.data.metrics)
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS)


def _require_local_store(uri: str) -> None:
    """Reading must not create: MLflow would make an empty store at a mistyped local path."""
    local = {"sqlite:///": uri[len("sqlite:///"):], "file://": uri[len("file://"):]}
    for scheme, path in local.items():
        if uri.startswith(scheme) and not Path(unquote(path)).exists():
            raise AnalysisError(f"no MLflow store at {unquote(path)} (tracking URI {uri})")


def load_studies(tracking_uri: str | None, experiments: list[str]) -> pd.DataFrame:
    """The trials of several experiments in one frame (its `experiment` column tells them apart)."""
    if not experiments:
        raise AnalysisError("no experiments named to compare")
    frames = [load_trials(tracking_uri, name) for name in experiments]
    return pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True)


def formatted(view: pd.DataFrame) -> pd.DataFrame:
    """The same frame with every known numeric column as display strings ("-" where missing)."""
    view = view.copy()
    for col, spec in FORMATS.items():
        if col in view:
            view[col] = view[col].map(lambda v, spec=spec: spec.format(v) if pd.notna(v) else "-")
    return view.astype(object).where(view.notna(), "-")


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
    cols[at:at] = [c for c in EXTRA_SCORES if c in df.columns and df[c].notna().any()]
    cols = cols[:2] + varying + cols[2:]
    df = not_applicable_blanked(df)
    view = df.sort_values(sort_by, ascending=False, na_position="last")[cols] \
        if sort_by in df.columns else df[cols]
    return formatted(view).to_string(index=False)
