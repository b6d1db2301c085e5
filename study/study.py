"""The study itself: zoo and world ready, MLflow parent run, Ray Tune + Optuna over trials, the table."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _ray_init(address: str | None) -> None:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # trials print similar progress lines; keep them all
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
           "MMSCALE_CACHE": os.environ.get("MMSCALE_CACHE", "")}
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


def run_study(args, space, p: dict) -> int:
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from analysis.frontier import log_study_frontier
    from analysis.runs import AnalysisError, format_table, load_trials
    from study import tracking, zoo
    from trainables.driver import StudyContext, run_trial

    report = p.get("data")  # the checked --data dataset (trainables.dataset.Report), or None: the world
    if report is None:
        zoo.ensure_world()
    zoo.ensure_zoo()
    storage = Path(args.storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    data = trial_data(report, storage) if report is not None else None
    uri = tracking.resolve_uri(args.tracking_uri)
    client = MlflowClient(uri)
    exp_id = tracking.ensure_experiment(client, p["study"], uri)
    settings = {"space_file": str(space.path), "num_samples": p["num_samples"], "smoke": args.smoke,
                "max_concurrent": p["max_concurrent"], "storage": str(storage), **{
                    f"space.{k}": repr(v) for k, v in space.space.items()}}
    if report is not None:
        settings.update({"data": str(report.root.resolve()), "skip_invalid": args.skip_invalid,
                         "data_read": str(data)})
    parent = tracking.start_study_run(client, exp_id, p["study"], settings)
    if report is not None:
        log_skipped(client, parent, report, data)

    _ray_init(args.address)
    if args.address and not (args.max_concurrent or space.max_concurrent):
        p["max_concurrent"] = _cluster_concurrency(p)
    study_ctx = StudyContext(tracking_uri=uri, experiment_id=exp_id, storage=str(storage),
                             cpus_per_worker=p["cpus_per_worker"])
    if data is not None:  # what was checked (and maybe filtered) is what every trial reads, smoke or not
        space.fixed = {**space.fixed, "data": str(data)}
        space.smoke = {k: v for k, v in space.smoke.items() if k != "data"}
    space.fixed = {**space.fixed, "storage": str(storage)}
    searcher = OptunaSearch(space=space.define_by_run(args.smoke), metric=space.metric, mode=space.mode,
                            sampler=space.optuna_sampler())
    trainable = tune.with_resources(tune.with_parameters(run_trial, study=study_ctx), {"CPU": 0, "memory": 256 * 2**20})
    # ^ the trial's driver only waits on its TorchTrainer: no CPU, so the workers can have them all
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=p["num_samples"],
                                    max_concurrent_trials=p["max_concurrent"]),
        run_config=tune.RunConfig(
            name=p["study"], storage_path=str(storage / "tune"), verbose=1,
            callbacks=[tracking.NestedMLflowCallback(uri, p["study"], parent, p["study"])],
            failure_config=tune.FailureConfig(max_failures=0)),
    )
    status = "FAILED"
    try:
        results = tuner.fit()
        errors = [r.error for r in results if r.error is not None]
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent, status=status)
    df = load_trials(uri, p["study"])
    df = df[df["parent_run_id"] == parent]
    print(f"\nStudy {p['study']!r}: {len(df)} trials ({len(errors)} failed), sorted by score "
          f"(gpu_hours = device-hours per node of {p['example'].devices_per_node}):")
    print(format_table(df))
    try:
        out = log_study_frontier(uri, p["study"], parent, storage / "frontier" / parent)
        print(f"\nFrontier (score vs gpu_hours): {out / 'frontier.png'}, {out / 'frontier.csv'}, "
              f"{out / 'table.md'}; also artifacts frontier/ of the study's run {parent}")
    except AnalysisError as e:
        print(f"\nno frontier: {e}")
    print(f"\nMLflow tracking URI: {uri}")
    print(f"Open the UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return 1 if errors and len(errors) == len(df) else 0


if __name__ == "__main__":
    sys.exit("use: python -m study.run SPACE_FILE")
