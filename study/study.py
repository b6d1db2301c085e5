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


def _ray_init(address: str | None) -> None:
    import ray

    # Train V2 turns a worker's print into a log record and, when stdout is wrapped (it is, in a Ray worker),
    # also prints it: every progress line reached the terminal twice. Plain prints, once each.
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "MMSCALE_CACHE": os.environ.get("MMSCALE_CACHE", "")}
    env = {k: v for k, v in env.items() if v}
    # The dashboard stays on (Ray's state API frees stopped trials' placement groups), bound to loopback.
    ray.init(address=address, include_dashboard=None if address else True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": env}, log_to_driver=True, configure_logging=True, logging_level="WARNING")


def _cluster_concurrency(p: dict) -> int:
    import ray

    res = ray.cluster_resources()
    devices = int(res.get("GPU", 0)) if p["device"] == "gpu" else int(res.get("CPU", 1))
    return max(1, devices // (p["workers_per_trial"] * (1 if p["device"] == "gpu" else p["cpus_per_worker"])))


def trial_data(report, storage: Path) -> Path:
    """The dataset directory every trial reads (absolute: Ray moves workers' working directories).

    With records to drop (--skip-invalid), a filtered copy under the study's storage,
    named by the dataset's fingerprint so a rerun reuses it.
    """
    from trainables import dataset

    skipped = report.skipped()
    if not skipped:
        return report.root.resolve()
    out = dataset.write_filtered(report.root, report, storage / "data" / report.fingerprint())
    print(f"data: dropped {len(skipped)} of {sum(report.counts.values()):,} records (--skip-invalid); "
          f"trials read {out}, the dropped ids and reasons are in {out / dataset.SKIPPED}")
    return out


def log_skipped(client, parent: str, report, data: Path) -> None:
    """On the study's run: how many records were dropped, and which and why (artifact data/skipped.json)."""
    from trainables import dataset

    client.log_metric(parent, "skipped_records", len(report.skipped()))
    if (data / dataset.SKIPPED).is_file():
        client.log_artifact(parent, str(data / dataset.SKIPPED), "data")


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


def settings(args, space, p: dict) -> dict:
    """The study's settings: logged on its run, and what `--resume` must find unchanged."""
    storage = Path(args.storage).resolve()
    values = {"space_file": str(space.path.resolve()), "num_samples": p["num_samples"], "smoke": args.smoke,
              "max_concurrent": p["max_concurrent"], "storage": str(storage),
              "constants": repr(dict(sorted(space.constants(args.smoke).items()))),
              **{f"space.{k}": repr(v) for k, v in space.space.items()}}
    report = p.get("data")
    if report is not None:
        values.update({"data": str(report.root.resolve()), "skip_invalid": args.skip_invalid})
    return values


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


def run_study(args, space, p: dict) -> int:
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from analysis.frontier import log_study_frontier
    from analysis.runs import AnalysisError, format_table, load_trials
    import zoo
    from study import mlflow_runs as tracking
    from tracking import store
    from trainables.driver import StudyContext

    report = p.get("data")  # the checked --data dataset (trainables.dataset.Report), or None: the world
    if report is None:
        zoo.ensure_world()
    zoo.ensure_zoo()
    storage = Path(args.storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    data = trial_data(report, storage) if report is not None else None
    uri = store.resolve_uri(args.tracking_uri)
    client = MlflowClient(uri)
    exp_id = store.ensure_experiment(client, p["study"], uri)
    resumed = p.get("resume")  # the study's run to continue (run.check_resume), or None: a new study
    if resumed is None:
        parent = tracking.start_study_run(client, exp_id, p["study"], {
            **settings(args, space, p), **({"data_read": str(data)} if data is not None else {})})
        if report is not None:
            log_skipped(client, parent, report, data)
    else:
        parent = resumed.info.run_id
        n = tracking.reopen(client, resumed, "resumes")
        print(f"resuming study {p['study']!r} (resume {n}) in its MLflow run {parent}")

    _ray_init(args.address)
    if args.address and not (args.max_concurrent or space.max_concurrent):
        p["max_concurrent"] = _cluster_concurrency(p)
    study_ctx = StudyContext(tracking_uri=uri, experiment_id=exp_id, storage=str(storage),
                             cpus_per_worker=p["cpus_per_worker"])
    trainable = tune.with_resources(tune.with_parameters(study_trial, study=study_ctx),
                                    {"CPU": 0, "memory": 256 * 2**20})
    # ^ the trial's driver only waits on its TorchTrainer: no CPU, so the workers can have them all
    tune_dir = storage / "tune" / p["study"]
    if resumed is not None and restorable(tune_dir):
        # Tune's saved state, the searcher's included: finished and failed trials stay as they are (a failure
        # is a result, not retried), unfinished ones run again under their trial ids, so in their own runs.
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:  # a new study, or one killed before Tune saved anything (its run is kept all the same)
        if data is not None:  # what was checked (and maybe filtered) is what every trial reads, smoke or not
            space.fixed = {**space.fixed, "data": str(data)}
            space.smoke = {k: v for k, v in space.smoke.items() if k != "data"}
        space.fixed = {**space.fixed, "storage": str(storage)}
        searcher = OptunaSearch(space=space.define_by_run(args.smoke), metric=space.metric, mode=space.mode,
                                sampler=space.optuna_sampler())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=p["num_samples"],
                                        max_concurrent_trials=p["max_concurrent"]),
            run_config=tune.RunConfig(
                name=p["study"], storage_path=str(storage / "tune"), verbose=1,
                callbacks=[tracking.NestedMLflowCallback(uri, p["study"], parent, p["study"])],
                # A failed trial is a result: Tune never runs it again. Ray Train restarts a trial's dead
                # workers inside the trial (trainables.driver's FailureConfig); the two do not overlap.
                failure_config=tune.FailureConfig(max_failures=0)),
        )
    status = "FAILED"
    try:
        results = tuner.fit()
        # Ctrl-C makes Tune stop, save its state and return; trials are then missing or unfinished
        done = len(results) - unfinished_trials(tune_dir)
        status = "FINISHED" if done == len(results) >= expected_trials(space, p["num_samples"]) else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.close_orphans(client, exp_id, parent, ORPHANED if status == "FINISHED" else INTERRUPTED)
        client.set_terminated(parent, status=status)
    runs = store.trial_runs(client, exp_id, parent)
    finished, failed, other = tracking.outcome(runs)
    df = load_trials(uri, p["study"], parent_run_id=parent)
    ended = len(finished) + len(failed)
    print(f"\nStudy {p['study']!r}: {ended} trial{'s' * (ended != 1)}, {len(failed)} failed"
          f"{': ' + tracking.failure_counts(failed) if failed else ''}; the finished sorted by score "
          f"(gpu_hours = device-hours per node of {p['example'].devices_per_node}):")
    print(format_table(df[df["status"] == "FINISHED"]))
    for run in failed + other:
        why = run.data.tags.get("failure_reason") or run.data.tags.get("killed_reason", "")
        trial = run.data.tags.get(store.TRIAL_TAG)
        print(f"  {run.info.status.lower()}: trial {trial} (run {run.info.run_id}): {why}")
    try:
        out = log_study_frontier(uri, p["study"], parent, storage / "frontier" / parent)
        print(f"\nFrontier (score vs gpu_hours): {out / 'frontier.png'}, {out / 'frontier.csv'}, "
              f"{out / 'table.md'}; also artifacts frontier/ of the study's run {parent}")
    except AnalysisError as e:
        print(f"\nno frontier: {e}")
    print(f"\nMLflow tracking URI: {uri}")
    print(f"Open the UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    if status != "FINISHED":
        print(f"\nStudy interrupted with {done} of {expected_trials(space, p['num_samples'])} trials done: "
              f"the same command with --resume continues it", file=sys.stderr)
        return 1
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit("use: python -m study.run SPACE_FILE")
