"""A trial's side of the MLflow contract: rank 0's handle on its run, and why a trial failed.

Rank 0 of a trial attaches to the run the study's callback opened for it (found by the
trial-id tag, `tracking.store.TRIAL_TAG`) and logs per-step metrics, the final metrics
(named in `tracking.metrics.METRICS`) and the artifacts itself, before its last report.
A failed trial's run says why: the `failure_reason` tag (the root exception under Ray's
wrappers) and the artifact `error/traceback.txt`. No Ray import: analysis and the
worker both use this.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tracking.metrics import spec
from tracking.store import TRIAL_TAG, find_trial_run

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
        """One per-step value (`key` must be a per-step metric of tracking.metrics.METRICS)."""
        if not spec(key).per_step:
            raise ValueError(f"{key} is logged once per trial, not per step (tracking.metrics)")
        self._buffer.append(Metric(key, float(value), int(time.time() * 1000), step))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000])
        self._buffer = []

    def artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def about(self) -> dict[str, str]:
        """What the model card says about where the trial lives: its study (the experiment), its run's name
        (what varies, e.g. "1m r8 a32 lr3.5e-3") and run id."""
        run = self.client.get_run(self.run_id)
        return {"study": self.client.get_experiment(run.info.experiment_id).name,
                "trial": run.info.run_name or "", "run_id": self.run_id}

    def started(self) -> float:
        """When the trial's run started (seconds since the epoch): the driver opened it as the trial started."""
        return self.client.get_run(self.run_id).info.start_time / 1000

    def stopped_early(self) -> bool:
        """Whether the study's scheduler stopped this trial (the driver tags its run `stopped_early`)."""
        return "stopped_early" in self.client.get_run(self.run_id).data.tags

    def finish(self, metrics: dict, tags: dict) -> None:
        """The trial's final metrics (every name in tracking.metrics.METRICS, or UnknownMetric) and tags."""
        for key in metrics:
            spec(key)
        self.flush()
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                              tags=[_tag(k, v) for k, v in tags.items()])


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, str(value))


def record_failure(client: MlflowClient, run_id: str, reason: str, text: str) -> None:
    """A failed trial's run says why: the `failure_reason` tag and the artifact `error/traceback.txt`."""
    client.set_tag(run_id, "failure_reason", reason[:500])
    client.log_text(run_id, f"{reason}\n\n{text}", "error/traceback.txt")


def describe(error: BaseException) -> tuple[str, str]:
    """Why a trial failed, from the exception in hand: (`Type: first line of the message` of the root
    cause under Ray's wrappers, the whole traceback with each failed rank's)."""
    import traceback

    root = root_cause(error)
    first = (str(root).strip().splitlines() or [""])[0]
    reason = f"{type(root).__name__}: {first}" if first else type(root).__name__
    return reason, _plain("".join(traceback.format_exception(error)))


def failure_from_text(error_file: str | None) -> tuple[str, str]:
    """Why a trial failed, from the text Tune wrote beside it (its last line names the error). Only text:
    Tune also pickles the exception there, and we load no pickles from storage."""
    text = _plain(Path(error_file).read_text(errors="replace")) if error_file and Path(error_file).is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown (Tune kept no error for this trial)"), text


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # Ray colours the remote traceback's header


def root_cause(error: BaseException) -> BaseException:
    """The exception that started it: through Ray's RayTaskError (`.cause`), Ray Train's
    WorkerGroupError (`.worker_failures`, the lowest rank's) and Python's `__cause__` chain."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        cause = getattr(error, "cause", None)
        if failures:
            error = failures[min(failures)]
        elif isinstance(cause, BaseException):
            error = cause
        elif error.__cause__ is not None:
            error = error.__cause__
        else:
            break
    return error
