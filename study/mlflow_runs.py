"""MLflow, as DESIGN.md's contract says: one parent run per study, one nested run per trial.

Driver side, `NestedMLflowCallback` (a small subclass of Ray's MLflowLoggerCallback,
which does not nest) opens each trial's run under the study's parent, logs the flat
trial config as params once, and closes the run when the trial ends: FINISHED, or
FAILED with a `failure_reason` tag and the traceback as `error/traceback.txt`. Worker
side, rank 0 attaches to its trial's run through `TrialLog` (found by the trial-id tag)
and logs per-step loss, the final metrics and the artifacts itself, before it reports.

A resumed study (`--resume`) keeps every run: its parent is reopened (tag `resumes`),
a trial Tune continues finds its run by the trial-id tag and goes on in it (tag
`restarts`), and a run whose trial will not run again is closed KILLED with a
`killed_reason` tag (`close_orphans`), so no run is left RUNNING and none is doubled.
"""

from __future__ import annotations

from collections import Counter

from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback

from tracking.store import PARENT_TAG, SETTLED, STUDY_TAG, TRIAL_TAG, find_trial_run, params_of, trial_runs
from tracking.trial_log import failure_from_text, record_failure
from trainables.config import trial_config


def start_study_run(client: MlflowClient, experiment_id: str, study: str, params: dict) -> str:
    run = client.create_run(experiment_id, run_name=study, tags={STUDY_TAG: study, "mlflow.runName": study})
    client.log_batch(run.info.run_id, params=params_of(params))
    return run.info.run_id


def reopen(client: MlflowClient, run, counter: str) -> int:
    """A run goes on after an interruption: RUNNING again, `counter` tag + 1 (returned)."""
    count = int(run.data.tags.get(counter, 0)) + 1
    client.set_tag(run.info.run_id, counter, str(count))
    if "killed_reason" in run.data.tags:  # closed when the study stopped; no longer so
        client.delete_tag(run.info.run_id, "killed_reason")
    client.update_run(run.info.run_id, status="RUNNING")
    return count


def close_orphans(client: MlflowClient, experiment_id: str, parent_run_id: str, reason: str) -> int:
    """Close the study's trial runs left RUNNING (their trial will not run in this session) as KILLED."""
    orphans = [r for r in trial_runs(client, experiment_id, parent_run_id) if r.info.status == "RUNNING"]
    for run in orphans:
        client.set_tag(run.info.run_id, "killed_reason", reason)
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(orphans)


def outcome(runs: list) -> tuple[list, list, list]:
    """(finished, failed, other) trial runs of a study."""
    return ([r for r in runs if r.info.status == "FINISHED"], [r for r in runs if r.info.status == "FAILED"],
            [r for r in runs if r.info.status not in SETTLED])


def failure_counts(failed: list) -> str:
    """`FloatingPointError x2, MemoryError x1`: the failed runs' exception types, most common first."""
    kinds = Counter(r.data.tags.get("failure_reason", "unknown").split(":")[0] for r in failed)
    return ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common())


class NestedMLflowCallback(MLflowLoggerCallback):
    """Trial runs nested under the study's parent run; metrics come from the workers."""

    def __init__(self, tracking_uri: str, experiment_name: str, parent_run_id: str, study: str):
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment_name, save_artifact=False)
        self.parent_run_id, self.study = parent_run_id, study

    def setup(self, *args, **kwargs):
        super().setup(*args, **kwargs)
        self._settled: set[str] = set()  # runs whose outcome was logged before the study was resumed

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_runs:
            return
        client = self.mlflow_util._get_client()
        exp_id = client.get_experiment_by_name(self.experiment_name).experiment_id
        existing = find_trial_run(client, exp_id, trial.trial_id)
        if existing is not None:  # a resumed study: the trial goes on in its own run
            self._trial_runs[trial] = existing.info.run_id
            if existing.info.status in SETTLED:  # ended before Tune saved that it had (study.study_trial)
                self._settled.add(existing.info.run_id)
            else:  # interrupted (RUNNING, or KILLED when the study was stopped): it restarts here
                reopen(client, existing, "restarts")
            return
        tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id, STUDY_TAG: self.study,
                "trial_name": str(trial)}
        run = self.mlflow_util.start_run(tags=tags, run_name=f"{self.study}-{trial.trial_id}")
        self._trial_runs[trial] = run.info.run_id
        client.log_batch(run.info.run_id, params=params_of(trial_config(trial.config).logged_params()))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        pass  # rank 0 logs metrics straight to the run (per step, and the finals before reporting)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        run_id = self._trial_runs.get(trial)
        if run_id is None or run_id in self._settled:
            return
        client = self.mlflow_util._get_client()
        if failed and "failure_reason" not in client.get_run(run_id).data.tags:
            # the trial died before it could say why itself (study.study_trial): Tune's text of the error
            record_failure(client, run_id, *failure_from_text(trial.error_file))
        self.mlflow_util.end_run(run_id=run_id, status="FAILED" if failed else "FINISHED")
