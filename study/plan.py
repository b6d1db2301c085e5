"""The study plan: everything a study will do, decided once from the command line and the space file.

    plan, lock = make_plan(args, space)    # raises BadInput (one `error:` line, exit 2) before Ray starts

A frozen `Plan` is built here and only read afterwards: the trials, their resources and
concurrency, the storage and tracking store, the checked data (trainables.prepare, which
also writes the shards trials read), what the data decided (stage 1 skipped without caption
pairs), and which MLflow run a `--resume` continues. Nothing mutates the loaded space.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from trainables.config import TrialConfig


SMOKE_SEEDS = 2  # --smoke runs the seed machinery (two seeds of a configuration), not all of SEEDS


class BadInput(Exception):
    """Reported as one `error:` line and exit code 2."""


@dataclass(frozen=True)
class Plan:
    study: str                   # the study's name: its MLflow experiment and its folder in storage
    space_file: Path
    smoke: bool
    num_samples: int             # configurations to run (NUM_SAMPLES or --num-samples)
    max_concurrent: int          # trials at once
    cpus_per_worker: int         # CPU threads of each Ray Train worker
    workers_per_trial: int
    device: str                  # "cpu" or "gpu"
    constants: dict              # TrialConfig values every trial gets: FIXED (+ SMOKE) + what the data decided
    example: TrialConfig         # one trial of the space, for the printout
    storage: Path                # absolute: Ray Tune's state, stage-1 cache, shards, Ray Train runs
    tracking_uri: str            # absolute
    address: str | None          # a Ray cluster, or None: a local Ray on 127.0.0.1
    data: object                 # trainables.data.check.DataPlan (shards unwritten on a dry run)
    report: object               # trainables.data.records.Report: problems (dropped with --skip-invalid), notes
    data_dir: str = ""           # --data as given ("" = the synthetic world)
    stage1_data: str = ""        # --stage1-data as given
    skip_invalid: bool = False
    resume_run: str | None = None  # the MLflow run of the study --resume continues
    resume_status: str = ""
    dry_run: bool = False
    decisions: tuple[str, ...] = field(default_factory=tuple)  # what the plan changed because of the data, said
    budget_gpu_hours: float | None = None   # the budget in GPU-hours per node (the tighter of the two given)
    budget_dollars: float | None = None
    forecaster: object = None               # study.forecast.Forecaster, or None where there is no forecast
    forecast_note: str = ""                 # why there is none
    seeds: int = 1                          # trials per configuration (SEEDS)
    grid_size: int | None = None            # configurations a grid has (None: not a grid)

    @property
    def configurations(self) -> int:
        """Configurations the study runs: num_samples, or fewer where a grid runs out."""
        return self.num_samples if self.grid_size is None else min(self.num_samples, self.grid_size)

    @property
    def trials(self) -> int:
        """Tune trials: every configuration at every seed."""
        return self.configurations * self.seeds

    def settings(self, space) -> dict:
        """The study's settings: logged on its run, and what `--resume` must find unchanged."""
        values = {"space_file": str(space.path.resolve()), "num_samples": self.num_samples, "smoke": self.smoke,
                  "max_concurrent": self.max_concurrent, "storage": str(self.storage),
                  "constants": repr(dict(sorted(space.constants(self.smoke).items()))),
                  **{f"space.{k}": repr(v) for k, v in space.space.items()}}
        if self.data_dir:
            values.update({"data": str(Path(self.data_dir).resolve()), "skip_invalid": self.skip_invalid})
        if self.stage1_data:
            values["stage1_data"] = str(Path(self.stage1_data).resolve())
        if self.budget_gpu_hours is not None:
            values["budget_gpu_hours"] = self.budget_gpu_hours
        if self.budget_dollars is not None:
            values["budget_dollars"] = self.budget_dollars
        if space.objectives:
            values["objectives"] = repr(space.objectives)
        if self.seeds > 1:
            values["seeds"] = self.seeds
        return values


def make_plan(args, space):
    """(Plan, the study's lock held for this driver, or None on a dry run), or BadInput."""
    import zoo

    smoke = args.smoke
    study = args.experiment or space.name
    num_samples = args.num_samples or (min(space.num_samples, 3) if smoke else space.num_samples)
    example = space.sample(seed=space.seed, smoke=smoke)
    storage = Path(args.storage).resolve()
    if storage.exists() and not storage.is_dir():
        raise BadInput(f"--storage {args.storage}: is a file; the study needs a directory (it creates it if absent)")
    from tracking.store import resolve_uri

    uri = resolve_uri(args.tracking_uri)
    check_tracking_uri(uri, "--tracking-uri" if args.tracking_uri else "$MLFLOW_TRACKING_URI")
    cpus, gpus = resources(args.address)
    where = f"the cluster at {args.address}" if args.address else "this machine"
    workers = {cfg.num_workers for cfg in space.encoding_configs(smoke)} | {example.num_workers}
    gpu_trials = any(cfg.use_gpu for cfg in space.encoding_configs(smoke)) or example.use_gpu
    if gpu_trials and gpus == 0:
        raise BadInput(f"{space.path}: use_gpu is True, but {where} has no GPU (torch sees none); set use_gpu "
                       "False to train on the CPU")
    devices = gpus if example.use_gpu else cpus
    if max(workers) > devices:
        kind = "GPUs" if example.use_gpu else "CPUs"
        raise BadInput(f"{space.path}: num_workers={max(workers)} workers per trial, but {where} has {devices} "
                       f"{kind}: no trial could ever start")
    device = "gpu" if example.use_gpu else "cpu"
    max_concurrent = args.max_concurrent or space.max_concurrent or max(1, devices // example.num_workers)
    cpus_per_worker = 1 if example.use_gpu else max(1, cpus // (max_concurrent * example.num_workers))
    base = dict(study=study, space_file=space.path, smoke=smoke, num_samples=num_samples,
                seeds=min(space.seeds, SMOKE_SEEDS) if smoke else space.seeds,
                grid_size=space.grid_size() if space.sampler == "grid" else None,
                max_concurrent=max_concurrent, cpus_per_worker=cpus_per_worker, workers_per_trial=example.num_workers,
                device=device, constants=space.constants(smoke), example=example, storage=storage,
                tracking_uri=uri, address=args.address, data=None, report=None, data_dir=args.data or "",
                stage1_data=args.stage1_data or "", skip_invalid=args.skip_invalid, dry_run=args.dry_run)
    if args.skip_invalid and not args.data:
        raise BadInput("--skip-invalid applies to a --data DIR dataset; the synthetic world has no invalid records")
    for flag, value in (("--data", args.data), ("--stage1-data", args.stage1_data)):
        if value and not Path(value).is_dir():
            raise BadInput(f"{flag} {value}: no such directory")
    lock, resume_run, resume_status = check_resume(args, space, Plan(**base))
    try:
        root = Path(args.data) if args.data else zoo.ensure_world()
        zoo.ensure_zoo()
        report, data, constants, decisions = check_data(root, args, space, storage)
        forecaster, note = forecast(space, smoke, constants, data, cpus_per_worker, gpus)
        budget_gpu_hours, budget_dollars = budgets(args, space, example, forecaster, note)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Plan(**{**base, "data": data, "report": report, "constants": constants, "resume_run": resume_run,
                   "resume_status": resume_status, "decisions": decisions, "forecaster": forecaster,
                   "forecast_note": note, "budget_gpu_hours": budget_gpu_hours,
                   "budget_dollars": budget_dollars}), lock


def forecast(space, smoke: bool, constants: dict, data, threads: int, gpus: int):
    """(a study.forecast.Forecaster for the space's trials, or None; why there is none). Calibrates the
    training rate on this machine (once per model, method and machine; cached) unless DEVICE and MFU are given."""
    from study import forecast as fc
    from trainables.config import ConfigError

    try:
        configs = forecast_configs(space, smoke, constants)
    except ConfigError as e:
        raise BadInput(f"{space.path}: {e}") from None
    if any(cfg.use_gpu for cfg in configs) and gpus == 0 and space.device is None:
        return None, ("no cost forecast: the trials train on GPUs and this machine has none to measure; give "
                      "DEVICE and MFU in the study file (e.g. DEVICE = 'A100', MFU = 0.35)")
    return fc.make_forecaster(configs, data, space.device, space.mfu, threads,
                              say=lambda line: print(line, flush=True)), ""


def forecast_configs(space, smoke: bool, constants: dict) -> list:
    """The kinds of trial a forecast covers: every combination of the settings that decide a trial's shapes
    (Space.encoding_configs), with the study's constants where the space does not search them (as sampling)."""
    return [cfg.replace(**{k: v for k, v in constants.items() if k in cfg.to_dict() and k not in space.space})
            for cfg in space.encoding_configs(smoke)]


def budgets(args, space, example, forecaster, note: str) -> tuple[float | None, float | None]:
    """(the budget in GPU-hours per node, in dollars): the flags, else the study file's; the tighter one rules,
    converted at the trials' price per node-hour. A budget needs a forecast (it counts running trials by it)."""
    hours = args.budget_gpu_hours if args.budget_gpu_hours is not None else space.budget_gpu_hours
    dollars = args.budget_dollars if args.budget_dollars is not None else space.budget_dollars
    if hours is None and dollars is None:
        return None, None
    if forecaster is None:
        raise BadInput(f"a budget needs the cost forecast, and there is none ({note})")
    limits = [h for h in (hours, dollars / example.price_per_node_hour if dollars is not None else None)
              if h is not None]
    return min(limits), dollars


# Tracking URI schemes MLflow's client serves (a bare path is its file store, resolved to file:// first).
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "databricks", "postgresql", "mysql", "mssql")


def check_tracking_uri(uri: str, flag: str) -> None:
    """A tracking URI MLflow can store runs at, or BadInput naming it (credentials masked)."""
    from study.local_ray import mask_credentials

    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise BadInput(f"{flag} {mask_credentials(uri)}: not a tracking URI MLflow serves (use sqlite:///PATH, a "
                       f"directory, or {', '.join(s + '://...' for s in TRACKING_SCHEMES[2:])})")
    from tracking.store import server_problem

    if (problem := server_problem(uri)) is not None:
        raise BadInput(f"{flag} {mask_credentials(uri)}: {problem}")
    if scheme == "sqlite" and uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.is_dir() or (not db.parent.is_dir() and db.parent.exists()):
            raise BadInput(f"{flag} {uri}: {db} is a directory, not a SQLite file")


def reachable(address: str, timeout_s: float = 5.0) -> None:
    """BadInput unless something listens at a host:port `address` (Ray's own connect retries for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise BadInput(f"--address {address}: no Ray cluster answers there ({e.strerror or e})") from None


def resources(address: str | None) -> tuple[int, int]:
    """(CPUs, GPUs) trials can use: this machine's, or the cluster's at `address`."""
    if address:
        import ray

        reachable(address)
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        try:
            res = ray.cluster_resources()
        finally:
            ray.shutdown()  # only this driver's connection: the cluster goes on; the study connects again
        return int(res.get("CPU", 1)), int(res.get("GPU", 0))
    import torch

    return os.cpu_count() or 1, torch.cuda.device_count()


def check_data(root: Path, args, space, storage: Path):
    """The data every trial reads, checked for every encoding the space can produce (trainables.prepare),
    and what that decides: (report, DataPlan, constants, decisions said in the plan). BadInput on a problem
    (unless --skip-invalid may drop the records that have it)."""
    from trainables.config import ConfigError
    from trainables.prepare import prepare

    try:
        configs = space.encoding_configs(args.smoke)
    except ConfigError as e:
        raise BadInput(f"{space.path}: {e}") from None
    report, data = prepare(root, configs, storage, stage1=Path(args.stage1_data) if args.stage1_data else None,
                           write=not args.dry_run, skip_invalid=args.skip_invalid, seed=space.seed)
    if data is None:
        raise BadInput(report.first_error_line().removeprefix("error: "))
    constants, decisions = dict(space.constants(args.smoke)), list(report.notes)
    if "text_score" in space.goals() and not data.used("text_eval"):
        raise BadInput(f"{space.path}: the search optimises text_score, but {root} has no text_eval.json "
                       "(language-only records to score it on)")
    if not data.stage1:
        if "stage1_steps" in space.space:
            raise BadInput(f"{space.path}: SPACE['stage1_steps'] is searched, but there are no caption pairs for "
                           f"stage 1 (no captions.json in {root}; pass --stage1-data DIR)")
        constants["stage1_steps"] = 0
    mixes = space.values_of("mix_ratio", args.smoke)
    if max(mixes) > 0:
        text = data.used("text")
        if not text:
            where = "SPACE['mix_ratio']" if "mix_ratio" in space.space else "FIXED/SMOKE mix_ratio"
            raise BadInput(f"{space.path}: {where} can be {max(mixes):g}, but {root} has no text.json "
                           "(language-only records to mix into stage 2)")
        train = data.used("train")
        wanted = round(train * max(mixes) / (1 - max(mixes)))
        if wanted > text:
            decisions.append(f"text.json has {text:,} usable records: mix_ratio {max(mixes):g} would need "
                             f"{wanted:,}, so it is capped at {text / (train + text):.2f} (trials log "
                             "mix_ratio_used)")
    return report, data, constants, tuple(decisions)


def check_resume(args, space, plan: Plan):
    """A study is its name in --storage: refuse to start one that exists, and resume only one that exists,
    is unfinished and has the settings this command gives. Returns (the study's lock, held for this
    driver, or None on a dry run; the MLflow run to continue or None; its status).

    Decided twice: first only looking, so that a refused command creates nothing (no storage folder, no
    lock file); then again holding the lock, which no other driver of the study can hold meanwhile."""
    from filelock import Timeout

    from study.study import hold_lock
    from tracking import store

    storage = plan.storage
    name, where = plan.study, f"study {plan.study!r} in {storage}"

    def decide(create: bool):
        try:
            lock = hold_lock(storage, name, create=create)
        except Timeout:
            raise BadInput(f"{where} is running in another process; wait for it, or stop it and pass --resume") \
                from None
        try:
            return lock, _resumable(args, space, plan, store.find_study(plan.tracking_uri, name, str(storage)), where)
        except BaseException:
            if lock is not None:
                lock.release()  # and what taking it created (study.study.StudyLock)
            raise

    lock, run = decide(create=False)
    if not args.dry_run:
        lock, run = decide(create=True)
    return lock, (run.info.run_id if run else None), (run.info.status if run else "")


def _resumable(args, space, plan: Plan, run, where: str):
    tune_dir = plan.storage / "tune" / plan.study
    if not args.resume:
        if run is not None or tune_dir.exists():
            found = f"MLflow run {run.info.run_id}, {run.info.status}" if run else f"Ray Tune state {tune_dir}"
            raise BadInput(f"{where} already exists ({found}): pass --resume to continue it, "
                           "or choose another --experiment or --storage for a new study")
        return None
    if run is None:
        if tune_dir.exists():
            raise BadInput(f"--resume: {tune_dir} holds {where}, but {plan.tracking_uri} has no MLflow run of it "
                           "(was it started with another --tracking-uri?)")
        raise BadInput(f"--resume: there is no {where} to resume (MLflow {plan.tracking_uri})")
    if run.info.status == "FINISHED":
        raise BadInput(f"--resume: {where} has finished (MLflow run {run.info.run_id}): nothing to resume; "
                       "choose another --experiment or --storage for a new study")
    from tracking.store import MAX_PARAM_CHARS

    given = {k: str(v)[:MAX_PARAM_CHARS] for k, v in plan.settings(space).items()}
    ignored = {"storage"} | (set() if args.max_concurrent else {"max_concurrent"})
    flags = ["space_file", "smoke", "num_samples", "max_concurrent", "data", "skip_invalid", "stage1_data"]
    for key in sorted((set(given) | set(run.data.params)) - ignored,  # a changed flag also changes constants:
                      key=lambda k: (flags.index(k) if k in flags else len(flags), k)):  # name the flag first
        before, now = run.data.params.get(key, "(none)"), given.get(key, "(none)")
        if before != now:
            raise BadInput(f"--resume: {where} was started with {key}={before}, this command gives {key}={now}: "
                           "resume with the same space file and flags, or start a new study with another "
                           "--experiment or --storage")
    return run


def print_plan(plan: Plan, space) -> None:
    ex = plan.example
    print(f"study {plan.study!r} from {space.path}")
    seeds = f" ({plan.configurations} configurations x {plan.seeds} seeds)" if plan.seeds > 1 else ""
    print(f"  {plan.trials} trials{seeds}, {plan.max_concurrent} at a time, "
          f"{plan.workers_per_trial} {plan.device} worker(s) per trial x {plan.cpus_per_worker} CPU")
    print(f"  searched: {', '.join(f'{k}={v}' for k, v in space.space.items())}")
    stage1 = plan.constants.get("stage1_steps", ex.stage1_steps)
    budget = ex.batch_size * (stage1 + ex.stage2_steps)
    print(f"  per trial: stage 1 {stage1} steps + stage 2 {ex.stage2_steps} steps at batch "
          f"{ex.batch_size} ({budget:,} samples), eval on {ex.eval_samples or 'all'} held-out samples")
    print(f"  cost is logged per trial as gpu_hours (device-hours / {ex.devices_per_node} per node) and "
          f"dollars (${ex.price_per_node_hour}/node-hour)")
    print(f"  example trial: {ex}")
    print_forecast(plan, space)
    if plan.resume_run is not None:
        print(f"  resumes the study's MLflow run {plan.resume_run} ({plan.resume_status}): "
              "finished and failed trials are kept, interrupted ones run again")
    print_data(plan)


def print_forecast(plan: Plan, space) -> None:
    """The cost forecast: per kind of trial (model, method, tower) and for the study, with the budget."""
    f = plan.forecaster
    if f is None:
        print(f"  {plan.forecast_note}")
        return
    where = (f"{f.device} at MFU {f.mfu:g} (peak x MFU)" if f.mfu is not None else
             "rates measured on this machine")
    print(f"  forecast (training FLOPs / sustained FLOP/s; {where}):")
    costs = []
    for cfg in forecast_configs(space, plan.smoke, plan.constants):
        hours = f.gpu_hours(cfg)
        costs.append(hours)
        tflops = sum(f.flops(cfg).values()) / 1e12
        print(f"    {cfg.method} {cfg.model_size} @{cfg.image_size}px: {tflops:.3g} TFLOPs, "
              f"{hours:.3g} GPU-hours per node, ${hours * cfg.price_per_node_hour:.4g} per trial "
              f"(rate {f.rate(cfg) / 1e9:,.1f} GFLOP/s per device)")
    low, high = min(costs) * plan.trials, max(costs) * plan.trials
    price = plan.example.price_per_node_hour
    print(f"    study of {plan.trials} trials: {low:.3g} to {high:.3g} GPU-hours per node "
          f"(${low * price:.4g} to ${high * price:.4g})")
    if plan.budget_gpu_hours is not None:
        print(f"  budget: {plan.budget_gpu_hours:.3g} GPU-hours per node (${plan.budget_gpu_hours * price:.4g}): "
              "trials are launched while spent + running forecasts stay within it")


def print_data(plan: Plan, limit: int = 10) -> None:
    from trainables.data.records import printable

    report = plan.report
    files = ", ".join(f"{name} {n:,}" for name, n in report.counts.items())
    print(f"  data: {printable(str(report.root))} ({files} records)")
    for line in plan.decisions:
        print(f"  data: {line}")
    skipped = report.skipped()
    if not skipped:
        print("  data: every record is valid")
        return
    print(f"  data: --skip-invalid drops {len(skipped)} of {sum(report.counts.values()):,} records:")
    for problem in report.problems[:limit]:
        if problem.index is not None:
            print(f"    {problem.where(report.root).removeprefix(str(report.root) + os.sep)}: {problem.message}")
    if len(report.problems) > limit:
        print(f"    ... and {len(report.problems) - limit} more")
