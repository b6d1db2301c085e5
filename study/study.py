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
import time
from pathlib import Path


# Why a trial run was closed as KILLED: its trial will not run again, or not in this session.
ORPHANED = ("its trial is not in the study's Ray Tune state (the driver was killed before Tune saved it); "
            "the search ran another trial in its place")
INTERRUPTED = "the study was interrupted before this trial finished; --resume continues it in this run"


class FailedBefore(RuntimeError):
    """A trial that failed before the study was interrupted, as its MLflow run recorded."""


def study_trial(config: dict, study, forecaster=None) -> None:
    """What Tune runs per trial: the driver's `run_trial`, unless the trial's outcome is already known.

    - The trial's run already has its outcome: the driver was killed after the trial ended (its run
      was closed) but before Tune saved that it had (every ~10 s), and Tune continues the trial on
      --resume. Its recorded result is reported again (a recorded failure raised again), so the run
      stays as it was and Optuna gets the same value.
    - An identical configuration already ran in this study (samplers repeat categorical points; with a
      fixed seed its result would repeat too): its result is reported, marked `repeat_of` (the searcher
      charges it nothing), and this trial's run is tagged `repeat_of` with no metrics of its own, so the
      frontier does not count one configuration twice. A twin still running is waited for.
    Otherwise the trial's forecast cost (study.forecast) goes on its run, and the trial trains.

    A trial that fails says why in its run here, where the exception is in hand (the
    driver's callback then closes the run FAILED); see tracking.describe.
    """
    import ray.tune
    from mlflow.tracking import MlflowClient

    from tracking.store import SETTLED, find_trial_run
    from tracking.trial_log import describe, record_failure
    from trainables.config import trial_config
    from trainables.driver import run_trial
    from trainables.processes import quiet_exit_requests

    quiet_exit_requests()
    trial_id = ray.tune.get_context().get_trial_id()
    client = MlflowClient(study.tracking_uri)
    run = find_trial_run(client, study.experiment_id, trial_id)
    if run is not None and run.info.status in SETTLED:
        print(f"[{trial_id}] ended before the study was interrupted ({run.info.status}); not run again", flush=True)
        if run.info.status == "FAILED":
            raise FailedBefore(run.data.tags.get("failure_reason", "unknown"))
        ray.tune.report(dict(run.data.metrics))
        return
    cfg = trial_config(config)
    twin = identical_trial(client, study.experiment_id, run, cfg, live_since_ms=study.session_start_ms)
    if twin is not None:
        stopped = twin.data.tags.get("stopped_early")
        print(f"[{trial_id}] the same configuration as trial {twin.data.tags.get('mmscale.trial_id')} "
              f"(run {twin.info.run_id}): {'stopped early' if stopped else 'its result'}, not trained again",
              flush=True)
        if run is not None:
            client.set_tag(run.info.run_id, "repeat_of", twin.info.run_id)
        if stopped:  # the same steps would be stopped again: its last interim result, so Optuna hears PRUNED
            last = client.get_metric_history(twin.info.run_id, "interim_score")
            ray.tune.report({"interim_score": last[-1].value if last else 0.0, "stage2_step": int(stopped),
                             "repeat_of": twin.info.run_id})
        else:
            ray.tune.report({**twin.data.metrics, "repeat_of": twin.info.run_id})
        return
    if forecaster is not None and run is not None:
        hours = forecaster.gpu_hours(cfg)
        client.log_metric(run.info.run_id, "forecast_gpu_hours", hours)
        client.log_metric(run.info.run_id, "forecast_dollars", hours * cfg.price_per_node_hour)
    try:
        return run_trial(config, study)
    except Exception as error:
        run = find_trial_run(client, study.experiment_id, trial_id)  # the callback opened it, if not before
        # Not failures: Tune stopping a trial (a scheduler, early or at its last rung after the final result)
        # kills its workers, and their death surfaces here.
        if run is not None and "stopped_early" not in run.data.tags and "score" not in run.data.metrics:
            record_failure(client, run.info.run_id, *describe(error))
        raise


def identical_trial(client, experiment_id: str, run, cfg, poll_s: float = 5.0, live_since_ms: int = 0):
    """The study's earlier trial run with the same configuration (the same logged params: a setting the method
    does not use, such as full fine-tuning's lora_rank in a grid over method x rank, does not count) (FINISHED, or stopped early; one still RUNNING
    is waited for if it started after `live_since_ms`, this session's start), or None. Failed runs and repeats
    themselves do not count, nor a RUNNING run of an interrupted session: it is an orphan that no one is
    training (closed when the study ends), or a trial Tune resumes later, which a wait here could block for
    good (`--max-concurrent 1`)."""
    from tracking.store import trial_runs
    from trainables.config import TrialConfig

    if run is None:
        return None
    parent = run.data.tags.get("mlflow.parentRunId")
    while True:
        twins = []
        for other in trial_runs(client, experiment_id, parent):
            if other.info.run_id == run.info.run_id or "repeat_of" in other.data.tags \
                    or other.info.start_time > run.info.start_time:
                continue
            try:  # the same in every setting its method uses: full fine-tuning at lora_rank 8 and 64 is one
                same = TrialConfig.from_params(other.data.params).logged_params() == cfg.logged_params()
            except ValueError:
                same = False
            live = other.info.status == "RUNNING" and other.info.start_time >= live_since_ms
            if same and (other.info.status == "FINISHED" or live or "stopped_early" in other.data.tags):
                twins.append(other)
        done = [t for t in twins if t.info.status == "FINISHED" or "stopped_early" in t.data.tags]
        if done:
            return done[0]
        if not any(t.info.status == "RUNNING" for t in twins):
            return None
        time.sleep(poll_s)


def hold_lock(storage: Path, study: str, create: bool):
    """The study's lock, `<storage>/tune/.<study>.lock`, held while a driver runs it (an OS lock: the OS drops
    it when the driver dies, even by SIGKILL).

    Returns the held `StudyLock`, or None where there is none to take (create=False: a dry run only looks,
    and creates nothing); raises filelock.Timeout when another process holds it, leaving nothing new behind.
    """
    from filelock import FileLock, Timeout

    path = storage / "tune" / f".{study}.lock"
    if not create:
        if path.exists():
            probe = FileLock(str(path))
            probe.acquire(blocking=False)
            probe.release()
        return None
    # what taking the lock creates, outermost first (FileLock makes the folders)
    created = [p for p in (storage, storage / "tune", path) if not p.exists()]
    lock = StudyLock(FileLock(str(path)), storage / "tune" / study, created)
    try:
        lock.lock.acquire(blocking=False)
    except Timeout:
        lock.remove_created()
        raise
    return lock


class StudyLock:
    """A held study lock (`lock`, a filelock.FileLock). `release()` also removes what taking it created (the
    lock file, then the folders, each only if empty) as long as the study has no Ray Tune state
    (`tune_dir`): a command refused after it took the lock (a bad --resume, data that fails the check)
    leaves nothing behind, while a study that ran keeps its lock file, as every other driver expects."""

    def __init__(self, lock, tune_dir: Path, created: list[Path]):
        self.lock, self.tune_dir, self.created = lock, tune_dir, created

    def release(self) -> None:
        self.lock.release()
        if not self.tune_dir.exists():
            self.remove_created()

    def remove_created(self) -> None:
        for path in reversed(self.created):  # the file, then the folders, innermost first
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:  # not empty (shards, another study's state), or gone already
                pass
        self.created = []


def restorable(tune_dir: Path) -> bool:
    """Tune saved enough to restore: its tuner.pkl (Tuner.can_restore) and one experiment state."""
    from ray import tune

    return tune.Tuner.can_restore(str(tune_dir)) and any(tune_dir.glob("experiment_state-*.json"))


def unfinished_trials(tune_dir: Path) -> int:
    """Trials that Tune's saved state has not ended: what --resume would run again. (After Ctrl-C,
    fit's results call the trials it stopped TERMINATED; the saved state keeps them unfinished.)"""
    from ray.tune import ExperimentAnalysis

    return sum(t.status not in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(tune_dir)).trials)



def run_study(plan, space, lock=None) -> int:
    """The study, as a recipe: its MLflow run, Ray, the tuner, the trials, the summary. `lock` (the study's,
    held by study.plan) is released at the end; the OS releases it if the driver dies."""
    try:
        parent, experiment_id = open_study_run(plan, space)
        local = start_ray(plan)
        tuner = make_tuner(plan, space, parent, experiment_id, local)
        status, done = fit(tuner, plan, space, parent, experiment_id)
        code = summarize(plan, space, parent, experiment_id, status, done)
        print_budget(plan, parent, experiment_id)
        return code
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


def start_ray(plan) -> bool:
    """A local Ray on 127.0.0.1 with token authentication, or the cluster at --address (study.local_ray);
    DeepSpeed's CPU op made safe first, so that no trial builds it or waits for a dead builder (trainables.ds_ops).

    On the local Ray: gloo's sockets (a trial's collectives) bind to the loopback interface too (by default gloo
    binds to the address the hostname resolves to; trainables.rendezvous), and the workers are told where their
    Ray is (RAY_ADDRESS): Ray Train's PlacementGroupCleaner asks Ray's State API, which without it looks for
    GCS processes on the machine and fails ("Found multiple active Ray instances", a traceback in the study's
    output, and no cleanup) whenever another Ray runs here, e.g. a second study.

    Returns whether the Ray is local (every trial's ranks on this machine: they meet through a file)."""
    import socket

    from study import local_ray
    from trainables import ds_ops, rendezvous

    # Train V2 turns a worker's print into a log record and, when stdout is wrapped (it is, in a Ray worker),
    # also prints it: every progress line reached the terminal twice. Plain prints, once each.
    # Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S and sees a finished trial
    # only then: at 1 s a trial's teardown took a median 2.3 s, at 0.25 s 1.2 s (bench.overhead, BENCHMARKS.md).
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "MMSCALE_CACHE": os.environ.get("MMSCALE_CACHE", "")}
    local = local_ray.starts_local(plan.address)
    if local:
        env["GLOO_SOCKET_IFNAME"] = rendezvous.loopback_interface()
        with socket.socket() as s:  # a free port for the GCS, so that its address is known before Ray starts
            s.bind((local_ray.LOOPBACK, 0))
            gcs_port = s.getsockname()[1]
        os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)  # read by Ray when it starts the GCS (ray_constants)
        env["RAY_ADDRESS"] = f"{local_ray.LOOPBACK}:{gcs_port}"  # the workers' only: here it would mean a cluster
    env.update(ds_ops.prepare())
    try:
        local_ray.init(plan.address, {k: v for k, v in env.items() if v})
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    if local:
        import ray

        started = ray._private.worker._global_node.gcs_address
        if started != env["RAY_ADDRESS"]:  # a Ray that no longer reads RAY_GCS_SERVER_PORT (tests/test_internals.py)
            raise RuntimeError(f"the local Ray's GCS is at {started}, not at {env['RAY_ADDRESS']} as its workers "
                               "were told")
    return local


def reuse_actors(space) -> bool:
    """Whether Tune runs a trial on the actor of one that finished, its imports (Ray Train, torch, MLflow) done:
    2.2 s less per trial (bench.overhead). Not with a scheduler: Tune keeps the actor of a trial it stopped as
    well, whose thread still waits on its TorchTrainer, and the next trial's reset then times out after 2 s,
    failing that trial (Tune's _on_trial_reset; ray-project/ray#29268)."""
    return space.scheduler is None


def make_tuner(plan, space, parent: str, experiment_id: str, local: bool = False):
    """Tune's saved state restored (--resume), or a new Tuner: Optuna over the space, one trial per config.
    `local`: the study's Ray is its own on this machine (start_ray's answer)."""
    from ray import tune

    from study import mlflow_runs
    from study.search import StoppedTrials, StudySearch
    from trainables.driver import StudyContext

    study_ctx = StudyContext(tracking_uri=plan.tracking_uri, experiment_id=experiment_id, storage=str(plan.storage),
                             data=plan.data, cpus_per_worker=plan.cpus_per_worker, local_ray=local,
                             session_start_ms=int(time.time() * 1000))
    trainable = tune.with_resources(tune.with_parameters(study_trial, study=study_ctx, forecaster=plan.forecaster),
                                    {"CPU": 0, "memory": 256 * 2**20})
    # ^ the trial's driver only waits on its TorchTrainer: no CPU, so the workers can have them all
    tune_dir = plan.storage / "tune" / plan.study
    if plan.resume_run is not None and restorable(tune_dir):
        # Tune's saved state, the searcher's included: finished and failed trials stay as they are (a failure
        # is a result, not retried), unfinished ones run again under their trial ids, so in their own runs.
        return tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    # a new study, or one killed before Tune saved anything (its run is kept all the same)
    goals = space.goals()
    several = len(goals) > 1
    searcher = StudySearch(space=space.define_by_run(plan.constants), sampler=space.optuna_sampler(),
                           metric=list(goals) if several else next(iter(goals)),
                           mode=list(goals.values()) if several else next(iter(goals.values())),
                           points_to_evaluate=space.seed_params() or None, budget_gpu_hours=plan.budget_gpu_hours,
                           forecast=plan.forecaster.gpu_hours_of if plan.forecaster is not None else None,
                           seeds=plan.seeds)
    scheduler = space.scheduler.scheduler(plan.example.stage2_steps, plan.example.interim_every, plan.smoke) \
        if space.scheduler is not None else None
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.trials,
                                    max_concurrent_trials=plan.max_concurrent, reuse_actors=reuse_actors(space)),
        run_config=tune.RunConfig(
            name=plan.study, storage_path=str(plan.storage / "tune"), verbose=1,
            callbacks=[mlflow_runs.NestedMLflowCallback(plan.tracking_uri, plan.study, parent, plan.study),
                       StoppedTrials(plan.tracking_uri, experiment_id)],  # after: it turns a stopped run KILLED
            # A failed trial is a result: Tune never runs it again. Ray Train restarts a trial's dead
            # workers inside the trial (trainables.driver's FailureConfig); the two do not overlap.
            failure_config=tune.FailureConfig(max_failures=0)),
    )


def spent(client, experiment_id: str, parent: str) -> float:
    """GPU-hours per node the study's trials spent: finished, stopped early or failed alike, repeats excluded
    (what `--resume` finds spent before, and what a budget is held against)."""
    from tracking.store import trial_runs

    return sum(r.data.metrics.get("gpu_hours", 0.0) for r in trial_runs(client, experiment_id, parent)
               if "repeat_of" not in r.data.tags)


def print_budget(plan, parent: str, experiment_id: str) -> None:
    """The line a budgeted study ends with: what it spent of what."""
    from mlflow.tracking import MlflowClient

    if plan.budget_gpu_hours is None:
        return
    used = spent(MlflowClient(plan.tracking_uri), experiment_id, parent)
    price = plan.example.price_per_node_hour
    print(f"Budget: spent {used:.4g} of {plan.budget_gpu_hours:.4g} GPU-hours per node "
          f"(${used * price:.4g} of ${plan.budget_gpu_hours * price:.4g})")


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
        complete = len(results) >= plan.trials or (
            plan.budget_gpu_hours is not None and spent(client, experiment_id, parent) >= plan.budget_gpu_hours)
        status = "FINISHED" if done == len(results) and complete else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow_runs.close_orphans(client, experiment_id, parent, ORPHANED if status == "FINISHED" else INTERRUPTED)
        client.set_terminated(parent, status=status)
    return status, done


def summarize(plan, space, parent: str, experiment_id: str, status: str, done: int) -> int:
    """The table of finished trials, the failed and stopped ones with why, the frontier (on the study's run
    too: mlflow_runs.finish_study_run), how to open the UI and the link to the study's runs; the exit code."""
    from mlflow.tracking import MlflowClient

    from analysis.frontier import log_study_frontier
    from analysis.runs import AnalysisError, format_table, load_trials
    from study import mlflow_runs
    from study.local_ray import mask_credentials
    from tracking import store

    client = MlflowClient(plan.tracking_uri)
    runs = store.trial_runs(client, experiment_id, parent)
    repeats = [r for r in runs if "repeat_of" in r.data.tags]  # answered from an identical earlier trial
    finished, failed, other = mlflow_runs.outcome([r for r in runs if r not in repeats])
    df = load_trials(plan.tracking_uri, plan.study, parent_run_id=parent)
    if not df.empty:
        df = df[~df["run_id"].isin({r.info.run_id for r in repeats})]
    ended = len(finished) + len(failed)
    print(f"\nStudy {plan.study!r}: {ended} trial{'s' * (ended != 1)}, {len(failed)} failed"
          f"{': ' + mlflow_runs.failure_counts(failed) if failed else ''}"
          f"{f', {len(repeats)} repeated an earlier configuration (not trained again)' if repeats else ''}; "
          f"the finished sorted by score (gpu_hours = device-hours per node of {plan.example.devices_per_node}):")
    print(format_table(df[df["status"] == "FINISHED"]) if not df.empty else "(no trials)")
    for run in failed + other:
        why = run.data.tags.get("failure_reason") or run.data.tags.get("killed_reason", "")
        print(f"  {run.info.status.lower()}: trial {run.data.tags.get(store.TRIAL_TAG)} (run {run.info.run_id}): {why}")
    out, front = plan.storage / "frontier" / parent, None
    try:
        front = log_study_frontier(plan.tracking_uri, plan.study, parent, out)
        print(f"\nFrontier (score vs gpu_hours): {out / 'frontier.png'}, {out / 'frontier.csv'}, "
              f"{out / 'table.md'}; also artifacts frontier/ of the study's run {parent}")
    except AnalysisError as e:
        print(f"\nno frontier: {e}")
    # the study's run tells the story: summary metrics, the frontier in its description, on_frontier tags
    view = mlflow_runs.finish_study_run(client, experiment_id, parent, plan.study, front)
    uri = mask_credentials(plan.tracking_uri)
    print(f"\nMLflow tracking URI: {uri}")
    if store.local_store(plan.tracking_uri) is not None:
        print(f"Open the UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        base = "http://127.0.0.1:5000"
    else:
        base = uri if uri.startswith(("http://", "https://")) else None
    if base is not None:
        print(f"The study's runs (trial names, on_frontier, score and cost; the study's run holds the frontier): "
              f"{mlflow_runs.ui_link(base, experiment_id, view)}")
    if status != "FINISHED":
        print(f"\nStudy interrupted with {done} of {plan.trials} trials done: "
              "the same command with --resume continues it", file=sys.stderr)
        return 1
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit("use: python -m study.run SPACE_FILE")
