"""Where and how runs are found in MLflow: tag names and tracking-URI rules (no Ray, so analysis stays light)."""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.tracking import MlflowClient

TRIAL_TAG = "mmscale.trial_id"
STUDY_TAG = "mmscale.study"
PARENT_TAG = "mlflow.parentRunId"


def resolve_uri(uri: str | None) -> str:
    """An absolute tracking URI: Ray moves each worker's working directory, so relative ones break."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a bare directory: MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a local store (absolute), else wherever the tracking server keeps them."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(uri)
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def find_trial_run(client: MlflowClient, experiment_id: str, trial_id: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
    return runs[0] if runs else None
