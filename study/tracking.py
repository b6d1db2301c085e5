"""MLflow, as DESIGN.md's contract says: one parent run per study, one nested run per trial.

Driver side, `NestedMLflowCallback` (a small subclass of Ray's MLflowLoggerCallback,
which does not nest) opens each trial's run under the study's parent, logs the flat
trial config as params once, and closes the run when the trial ends. Worker side,
rank 0 attaches to its trial's run through `TrialLog` (found by the trial-id tag) and
logs per-step loss, the final metrics and the artifacts itself, before it reports.
"""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback

from study.space import trial_config
from study.store import (PARENT_TAG, STUDY_TAG, TRIAL_TAG, artifact_root, ensure_experiment,  # noqa: F401
                         find_trial_run, resolve_uri)

def start_study_run(client: MlflowClient, experiment_id: str, study: str, params: dict) -> str:
    run = client.create_run(experiment_id, run_name=study, tags={STUDY_TAG: study, "mlflow.runName": study})
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def _params(values: dict):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


class NestedMLflowCallback(MLflowLoggerCallback):
    """Trial runs nested under the study's parent run; metrics come from the workers."""

    def __init__(self, tracking_uri: str, experiment_name: str, parent_run_id: str, study: str):
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment_name, save_artifact=False)
        self.parent_run_id, self.study = parent_run_id, study

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_runs:
            return
        client = self.mlflow_util._get_client()
        exp_id = client.get_experiment_by_name(self.experiment_name).experiment_id
        existing = find_trial_run(client, exp_id, trial.trial_id)
        if existing is not None:  # a restored study: keep logging into the same run
            self._trial_runs[trial] = existing.info.run_id
            return
        tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id, STUDY_TAG: self.study,
                "trial_name": str(trial)}
        run = self.mlflow_util.start_run(tags=tags, run_name=f"{self.study}-{trial.trial_id}")
        self._trial_runs[trial] = run.info.run_id
        client.log_batch(run.info.run_id, params=_params(trial_config(trial.config).to_dict()))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        pass  # rank 0 logs metrics straight to the run (per step, and the finals before reporting)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        run_id = self._trial_runs.get(trial)
        if run_id is not None:
            self.mlflow_util.end_run(run_id=run_id, status="FAILED" if failed else "FINISHED")


class TrialLog:
    """Rank 0's handle on its trial's MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str, flush_every: int = 50):
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self._buffer: list[Metric] = []

    @classmethod
    def attach(cls, uri: str, experiment_id: str, trial_id: str, timeout_s: float = 120) -> "TrialLog":
        client = MlflowClient(uri)
        deadline = time.monotonic() + timeout_s
        while True:  # the driver-side callback opens the run as the trial starts
            run = find_trial_run(client, experiment_id, trial_id)
            if run is not None:
                return cls(client, run.info.run_id)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no MLflow run tagged {TRIAL_TAG}={trial_id} in experiment {experiment_id}")
            time.sleep(0.5)

    def metric(self, key: str, value: float, step: int) -> None:
        self._buffer.append(Metric(key, float(value), int(time.time() * 1000), step))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000])
        self._buffer = []

    def artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def finish(self, metrics: dict, tags: dict) -> None:
        self.flush()
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                              tags=[_tag(k, v) for k, v in tags.items()])


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, str(value))
