"""The study itself: zoo and world ready, MLflow parent run, Ray Tune + Optuna over trials, the table.

A study is its name in a storage directory: `<storage>/tune/<study>` holds Ray Tune's
state (trials and the searcher's, Optuna's study included) and the MLflow run of that
name started with that storage is its parent run. `--resume` restores both after the
driver died at any moment (Tuner.restore; tracking.reopen): finished and failed trials
are kept, the interrupted one starts again in its own run (or resumes from Ray Train's
checkpoint), and the search goes on until the study has its trials. A lock file held
while a driver runs keeps a second one off the same study.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


# Why a trial run was closed as KILLED: its trial will not run again, or not in this session.
ORPHANED = ("its trial is not in the study's Ray Tune state (the driver was killed before Tune saved it); "
            "the search ran another trial in its place")
INTERRUPTED = "the study was interrupted before this trial finished; --resume continues it in this run"


class FailedBefore(RuntimeError):
    """A trial that failed before the study was interrupted, as its MLflow run recorded."""


def study_trial(config: dict, study) -> None:
    """What Tune runs per trial: the driver's `run_trial`, unless the trial's run already has its outcome.

    That happens when the driver was killed after a trial ended (its run was closed) but
    before Tune saved that it had (every ~10 s): Tune then continues the trial on --resume.
    Reporting the recorded result instead of training again keeps the run as it was and
    gives Optuna the same value; a recorded failure is raised again.

    A trial that fails says why in its run here, where the exception is in hand (the
    driver's callback then closes the run FAILED); see tracking.describe.
    """
    import ray.tune
    from mlflow.tracking import MlflowClient

    from tracking.store import SETTLED, find_trial_run
    from tracking.trial_log import describe, record_failure
    from trainables.driver import run_trial

    trial_id = ray.tune.get_context().get_trial_id()
    client = MlflowClient(study.tracking_uri)
    run = find_trial_run(client, study.experiment_id, trial_id)
    if run is None or run.info.status not in SETTLED:
        try:
            return run_trial(config, study)
        except Exception as error:
            run = find_trial_run(client, study.experiment_id, trial_id)  # the callback opened it, if not before
            if run is not None:
                record_failure(client, run.info.run_id, *describe(error))
            raise
    print(f"[{trial_id}] ended before the study was interrupted ({run.info.status}); not run again", flush=True)
    if run.info.status == "FAILED":
        raise FailedBefore(run.data.tags.get("failure_reason", "unknown"))
    ray.tune.report(dict(run.data.metrics))


def hold_lock(storage: Path, study: str, create: bool):
    """The study's lock, held while a driver runs it (the OS drops it when the driver dies, even by SIGKILL).

    Returns the held lock, or None where there is none to take (create=False: a dry run
    only looks); raises filelock.Timeout when another process holds it.
    """
    from filelock import FileLock

    path = storage / "tune" / f".{study}.lock"
    if not create and not path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    lock.acquire(blocking=False)
    if not create:
        lock.release()
        return None
    return lock


def restorable(tune_dir: Path) -> bool:
    """Tune saved enough to restore: its tuner.pkl (Tuner.can_restore) and one experiment state."""
    from ray import tune

    return tune.Tuner.can_restore(str(tune_dir)) and any(tune_dir.glob("experiment_state-*.json"))


def unfinished_trials(tune_dir: Path) -> int:
    """Trials that Tune's saved state has not ended: what --resume would run again. (After Ctrl-C,
    fit's results call the trials it stopped TERMINATED; the saved state keeps them unfinished.)"""
    from ray.tune import ExperimentAnalysis

    return sum(t.status not in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(tune_dir)).trials)


def expected_trials(space, num_samples: int) -> int:
    """Trials a complete study has: a grid runs out after its last combination."""
    return min(num_samples, space.grid_size()) if space.sampler == "grid" else num_samples


def run_study(plan, space, lock=None) -> int:
    """The study, as a recipe: its MLflow run, Ray, the tuner, the trials, the summary. `lock` (the study's,
    held by study.plan) is released at the end; the OS releases it if the driver dies."""
    try:
        parent, experiment_id = open_study_run(plan, space)
        start_ray(plan)
        tuner = make_tuner(plan, space, parent, experiment_id)
        status, done = fit(tuner, plan, space, parent, experiment_id)
        return summarize(plan, space, parent, experiment_id, status, done)
    finally:
        if lock is not None:
            lock.release()


def open_study_run(plan, space) -> tuple[str, str]:
    """(the study's MLflow run, its experiment): a new run with the study's settings, or the one --resume continues."""
    from mlflow.tracking import MlflowClient

    from study import mlflow_runs
    from tracking import store

    client = MlflowClient(plan.tracking_uri)
    experiment_id = store.ensure_experiment(client, plan.study, plan.tracking_uri)
    if plan.resume_run is None:
        parent = mlflow_runs.start_study_run(client, experiment_id, plan.study, plan.settings(space))
        if plan.report.skipped():
            log_skipped(client, parent, plan.report)
        return parent, experiment_id
    n = mlflow_runs.reopen(client, client.get_run(plan.resume_run), "resumes")
    print(f"resuming study {plan.study!r} (resume {n}) in its MLflow run {plan.resume_run}")
    return plan.resume_run, experiment_id


def log_skipped(client, parent: str, report) -> None:
    """On the study's run: how many records --skip-invalid dropped, and which and why (data/skipped.json)."""
    import json
    import tempfile

    client.log_metric(parent, "skipped_records", len(report.skipped()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "skipped.json"
        path.write_text(json.dumps(report.skipped(), indent=1, ensure_ascii=False), encoding="utf-8")
        client.log_artifact(parent, str(path), "data")


def start_ray(plan) -> None:
    """A local Ray on 127.0.0.1 with token authentication, or the cluster at --address (study.local_ray);
    DeepSpeed's CPU op made safe first, so that no trial builds it or waits for a dead builder (trainables.ds_ops)."""
    from study import local_ray
    from trainables import ds_ops

    # Train V2 turns a worker's print into a log record and, when stdout is wrapped (it is, in a Ray worker),
    # also prints it: every progress line reached the terminal twice. Plain prints, once each.
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "MMSCALE_CACHE": os.environ.get("MMSCALE_CACHE", "")}
    env.update(ds_ops.prepare())
    local_ray.init(plan.address, {k: v for k, v in env.items() if v})


def make_tuner(plan, space, parent: str, experiment_id: str):
    """Tune's saved state restored (--resume), or a new Tuner: Optuna over the space, one trial per config."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from study import mlflow_runs
    from trainables.driver import StudyContext

    study_ctx = StudyContext(tracking_uri=plan.tracking_uri, experiment_id=experiment_id, storage=str(plan.storage),
                             data=plan.data, cpus_per_worker=plan.cpus_per_worker)
    trainable = tune.with_resources(tune.with_parameters(study_trial, study=study_ctx),
                                    {"CPU": 0, "memory": 256 * 2**20})
    # ^ the trial's driver only waits on its TorchTrainer: no CPU, so the workers can have them all
    tune_dir = plan.storage / "tune" / plan.study
    if plan.resume_run is not None and restorable(tune_dir):
        # Tune's saved state, the searcher's included: finished and failed trials stay as they are (a failure
        # is a result, not retried), unfinished ones run again under their trial ids, so in their own runs.
        return tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    # a new study, or one killed before Tune saved anything (its run is kept all the same)
    searcher = OptunaSearch(space=space.define_by_run(plan.constants), metric=space.metric, mode=space.mode,
                            sampler=space.optuna_sampler())
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=plan.num_samples,
                                    max_concurrent_trials=plan.max_concurrent),
        run_config=tune.RunConfig(
            name=plan.study, storage_path=str(plan.storage / "tune"), verbose=1,
            callbacks=[mlflow_runs.NestedMLflowCallback(plan.tracking_uri, plan.study, parent, plan.study)],
            # A failed trial is a result: Tune never runs it again. Ray Train restarts a trial's dead
            # workers inside the trial (trainables.driver's FailureConfig); the two do not overlap.
            failure_config=tune.FailureConfig(max_failures=0)),
    )


def fit(tuner, plan, space, parent: str, experiment_id: str) -> tuple[str, int]:
    """Run the trials; (the study's status, trials done). Every trial run left RUNNING is closed, whatever happens."""
    from mlflow.tracking import MlflowClient

    from study import mlflow_runs

    client = MlflowClient(plan.tracking_uri)
    tune_dir = plan.storage / "tune" / plan.study
    status, done = "FAILED", 0
    try:
        results = tuner.fit()
        # Ctrl-C makes Tune stop, save its state and return; trials are then missing or unfinished
        done = len(results) - unfinished_trials(tune_dir)
        status = "FINISHED" if done == len(results) >= expected_trials(space, plan.num_samples) else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow_runs.close_orphans(client, experiment_id, parent, ORPHANED if status == "FINISHED" else INTERRUPTED)
        client.set_terminated(parent, status=status)
    return status, done


def summarize(plan, space, parent: str, experiment_id: str, status: str, done: int) -> int:
    """The table of finished trials, the failed ones with why, the frontier, how to open the UI; the exit code."""
    from mlflow.tracking import MlflowClient

    from analysis.frontier import log_study_frontier
    from analysis.runs import AnalysisError, format_table, load_trials
    from study import mlflow_runs
    from study.local_ray import mask_credentials
    from tracking import store

    client = MlflowClient(plan.tracking_uri)
    runs = store.trial_runs(client, experiment_id, parent)
    finished, failed, other = mlflow_runs.outcome(runs)
    df = load_trials(plan.tracking_uri, plan.study, parent_run_id=parent)
    ended = len(finished) + len(failed)
    print(f"\nStudy {plan.study!r}: {ended} trial{'s' * (ended != 1)}, {len(failed)} failed"
          f"{': ' + mlflow_runs.failure_counts(failed) if failed else ''}; the finished sorted by score "
          f"(gpu_hours = device-hours per node of {plan.example.devices_per_node}):")
    print(format_table(df[df["status"] == "FINISHED"]) if not df.empty else "(no trials)")
    for run in failed + other:
        why = run.data.tags.get("failure_reason") or run.data.tags.get("killed_reason", "")
        print(f"  {run.info.status.lower()}: trial {run.data.tags.get(store.TRIAL_TAG)} (run {run.info.run_id}): {why}")
    try:
        out = log_study_frontier(plan.tracking_uri, plan.study, parent, plan.storage / "frontier" / parent)
        print(f"\nFrontier (score vs gpu_hours): {out / 'frontier.png'}, {out / 'frontier.csv'}, "
              f"{out / 'table.md'}; also artifacts frontier/ of the study's run {parent}")
    except AnalysisError as e:
        print(f"\nno frontier: {e}")
    uri = mask_credentials(plan.tracking_uri)
    print(f"\nMLflow tracking URI: {uri}")
    print(f"Open the UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    if status != "FINISHED":
        print(f"\nStudy interrupted with {done} of {expected_trials(space, plan.num_samples)} trials done: "
              "the same command with --resume continues it", file=sys.stderr)
        return 1
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit("use: python -m study.run SPACE_FILE")
