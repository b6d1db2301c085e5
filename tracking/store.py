"""Where and how runs are found in MLflow: tag names, tracking-URI rules and store queries (no Ray: analysis reads it).

A study's own run is found by its name and storage (`find_study_run`): the pair that
`--resume` names, so a resumed study keeps its run; a trial's run by the trial-id tag.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

from mlflow.tracking import MlflowClient

TRIAL_TAG = "mmscale.trial_id"
STUDY_TAG = "mmscale.study"
PARENT_TAG = "mlflow.parentRunId"
SETTLED = ("FINISHED", "FAILED")  # a trial run in these states has its outcome; nothing may change it
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def params_of(values: dict):
    """MLflow Params of a flat dict (values as text, cut to what MLflow stores)."""
    from mlflow.entities import Param

    return [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in values.items()]


def local_store(uri: str) -> Path | None:
    """The file or directory behind a local tracking URI (None for a server): looking must not create it."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return Path(unquote(uri[len(scheme):]))
    return None


def server_problem(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why no tracking server answers at an http(s) URI (None: something listens there, or the URI is not a
    server's). Checked before use: MLflow's client retries a dead server for minutes, then raises."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        return f"not a server address ({e})"
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        return f"no tracking server answers at {parts.hostname}:{port} ({e.strerror or e})"
    return None


def resolve_uri(uri: str | None) -> str:
    """An absolute tracking URI: Ray moves each worker's working directory, so relative ones break."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a bare path: a file (or a name ending .db) is the SQLite store the default names
        path = Path(uri)
        if path.is_file() or path.suffix == ".db":
            return "sqlite:///" + str(path.resolve())
        return path.resolve().as_uri()  # a bare directory: MLflow's file store
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


def literal(value: str) -> str | None:
    """`value` as a string literal of MLflow's filter syntax, or None where it has none.

    MLflow's filter strings have no escape: a value holding `'` must be written in double
    quotes, one holding `"` in single quotes, and one holding both cannot be written at all
    (`where` then matches a prefix and compares exactly in Python)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def where(conditions: dict[str, str]) -> tuple[str, callable]:
    """(a filter string, an exact test of a run) for `{field: value}` equalities, such as
    {"params.storage": "/home/o'brien/studies"}: any value, quotes included, is matched exactly."""
    clauses = []
    for field, value in conditions.items():
        lit = literal(value)
        if lit is not None:
            clauses.append(f"{field} = {lit}")
        else:  # the longest prefix without a quote, then Python decides (LIKE's own wildcards only widen it)
            prefix = value[:min(value.index("'"), value.index('"'))]
            clauses.append(f"{field} LIKE '{prefix}%'")

    def matches(run) -> bool:
        return all(_field_of(run, field) == value for field, value in conditions.items())

    return " and ".join(clauses), matches


def _field_of(run, field: str):
    kind, _, name = field.partition(".")
    name = name.strip("`")
    if kind == "tags":
        return run.data.tags.get(name)
    if kind == "params":
        return run.data.params.get(name)
    return getattr(run.info, name)


def find_trial_run(client: MlflowClient, experiment_id: str, trial_id: str):
    query, matches = where({f"tags.`{TRIAL_TAG}`": trial_id})
    return next((r for r in all_runs(client, experiment_id, query) if matches(r)), None)


def find_study_run(client: MlflowClient, experiment_id: str, study: str, storage: str):
    """The study's own run (named after it, no parent) that was started on `storage`; the newest if several.
    Names and paths may hold quotes ("bob's study", /home/o'brien): `where` matches them exactly."""
    query, matches = where({f"tags.`{STUDY_TAG}`": study, "attributes.run_name": study, "params.storage": storage})
    runs = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])
    return next((r for r in runs if PARENT_TAG not in r.data.tags and matches(r)), None)


def find_study(uri: str, study: str, storage: str):
    """The study's own run in the store at `uri`, or None; a local store that does not exist stays so."""
    local = local_store(uri)
    if local is not None and not local.exists():
        return None
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    return find_study_run(client, exp.experiment_id, study, storage) if exp is not None else None


def all_runs(client: MlflowClient, experiment_id: str, query: str):
    """search_runs page by page: a tracking server caps one page (1000 by default)."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """Every trial run nested under a study's run."""
    query, matches = where({f"tags.`{PARENT_TAG}`": parent_run_id})
    return [r for r in all_runs(client, experiment_id, query) if matches(r)]
