"""An experiment's trial runs as a pandas DataFrame, and the study's cost table.

    from analysis.runs import load_trials
    df = load_trials("sqlite:////abs/mlflow.db", "lora")

One row per nested trial run: `run_id`, `status`, `parent_run_id`, the flat params
with their types restored (from TrialConfig), and the final value of every metric.
"""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from study.tracking import PARENT_TAG, resolve_uri
from trainables.config import TrialConfig

COST_COLUMNS = ["gpu_hours", "dollars", "trainable_params", "peak_mem_gb", "samples_per_s"]
TABLE_COLUMNS = ["model_size", "method", "lora_rank", "lora_alpha", "lr", "score"] + COST_COLUMNS


def _typed(key: str, value: str):
    field = TrialConfig.__dataclass_fields__.get(key)
    if field is None:
        return value
    kind = type(field.default)
    if kind is bool:
        return value == "True"
    try:
        return kind(float(value)) if kind is int else kind(value)
    except ValueError:
        return value


def load_trials(tracking_uri: str | None, experiment: str) -> pd.DataFrame:
    client = MlflowClient(resolve_uri(tracking_uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise KeyError(f"no MLflow experiment named {experiment!r} at {resolve_uri(tracking_uri)}")
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=50000):
        parent = run.data.tags.get(PARENT_TAG)
        if parent is None:
            continue  # the study's own run
        row = {"run_id": run.info.run_id, "status": run.info.status, "parent_run_id": parent}
        row.update({k: _typed(k, v) for k, v in run.data.params.items()})
        row.update(run.data.metrics)
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(df: pd.DataFrame, sort_by: str = "score") -> str:
    """Trials sorted by score with their cost columns, as aligned text."""
    if df.empty:
        return "(no trials)"
    cols = [c for c in TABLE_COLUMNS if c in df.columns]
    view = df.sort_values(sort_by, ascending=False, na_position="last")[cols].copy() \
        if sort_by in df.columns else df[cols].copy()
    fmt = {"lr": "{:.2e}".format, "gpu_hours": "{:.2e}".format, "dollars": "{:.4f}".format,
           "score": "{:.1f}".format, "peak_mem_gb": "{:.2f}".format, "samples_per_s": "{:.0f}".format,
           "trainable_params": "{:,.0f}".format, "lora_alpha": "{:g}".format}
    for col, f in fmt.items():
        if col in view:
            view[col] = view[col].map(lambda v, f=f: f(v) if pd.notna(v) else "-")
    return view.to_string(index=False)
