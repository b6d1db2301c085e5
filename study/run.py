"""Run a study: a Ray Tune search (Optuna) whose trials are Ray Train + DeepSpeed LLaVA tunings.

    python -m study.run search_spaces/lora.py [--smoke] [--num-samples N] [--max-concurrent K]
        [--tracking-uri URI] [--experiment NAME] [--storage DIR] [--address ADDR]
        [--data DIR [--skip-invalid]] [--resume] [--dry-run]

Exit 0 when at least one trial finished (failed trials are counted and their MLflow runs
say why), 2 on bad input (one `error:` line naming the file / record / key / flag), 1 otherwise.
A `--data` dataset is checked whole before Ray starts (and by --dry-run): a bad record is
bad input, unless --skip-invalid drops it (the study's MLflow run lists what was dropped).
A study is its name in --storage: starting it again is refused; after an interruption
(even SIGKILL), the same command with --resume continues it (study.study).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Read when Ray is first imported (study.space imports Ray Tune): trials print similar progress lines, and
# Ray's deduplication would fold them into "[repeated 4x across cluster]"; keep them all.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from study.space import SpaceError  # noqa: E402

class BadInput(Exception):
    """Reported as one `error:` line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we promise one line
        raise BadInput(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m study.run", description=__doc__.splitlines()[0])
    p.add_argument("space", help="search-space file (Python; it runs as code)")
    p.add_argument("--num-samples", type=int, help="trials to run (default: the file's NUM_SAMPLES)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the devices allow)")
    p.add_argument("--smoke", action="store_true", help="smallest budget that still runs every step")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the study's name)")
    p.add_argument("--storage", default="studies", help="Ray results and stage-1 cache (default ./studies)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: local)")
    p.add_argument("--data", help="a LLaVA-format dataset directory instead of the synthetic world")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop the dataset's invalid records (logged as data/skipped.json) instead of stopping")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted study of this name in --storage (the same command otherwise)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    for flag in ("num_samples", "max_concurrent"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise BadInput(f"--{flag.replace('_', '-')}={value} should be at least 1")
    return args


def plan(args, space) -> dict:
    """What will run: trials, resources and concurrency (no Ray needed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    example = space.sample(seed=space.seed, smoke=args.smoke)
    num_samples = args.num_samples or (min(space.num_samples, 3) if args.smoke else space.num_samples)
    cpus = os.cpu_count() or 1
    # Tune does not count the Train workers' resources: concurrency comes from devices per trial.
    devices = _gpus() if example.use_gpu else cpus
    max_concurrent = args.max_concurrent or space.max_concurrent or max(1, devices // example.num_workers)
    cpus_per_worker = 1 if example.use_gpu else max(1, cpus // (max_concurrent * example.num_workers))
    return dict(study=args.experiment or space.name, num_samples=num_samples, max_concurrent=max_concurrent,
                cpus_per_worker=cpus_per_worker, workers_per_trial=example.num_workers,
                device="gpu" if example.use_gpu else "cpu", example=example)


def check_data(args, space):
    """Validate the dataset every trial will read (the whole of it, before Ray starts).

    Returns its trainables.dataset.Report, or None for the synthetic world; raises
    BadInput on any problem unless --skip-invalid may drop the records that have them.
    """
    from trainables import dataset

    given = args.data or space.constants(args.smoke).get("data")
    if not given:
        if args.skip_invalid:
            raise BadInput("--skip-invalid applies to a --data DIR dataset; the synthetic world has no invalid records")
        return None
    root = Path(given)
    if not root.is_dir():
        where = "--data" if args.data else f"{space.path}: data"
        raise BadInput(f"{where} {given}: no such directory")
    report = dataset.validate(root)
    if report.fatal or (report.problems and not args.skip_invalid):
        raise BadInput(report.first_error_line().removeprefix("error: "))
    train = report.counts[dataset.REQUIRED]
    if not train:
        raise BadInput(f"{root / dataset.REQUIRED}: has no records to train on")
    if train == sum(s["file"] == dataset.REQUIRED for s in report.skipped()):
        raise BadInput(f"{root / dataset.REQUIRED}: none of its {train} records is valid, nothing is left to "
                       f"train on (first: {report.first_error_line().removeprefix('error: ')})")
    return report


def check_resume(args, space, p: dict) -> None:
    """A study is its name in --storage: refuse to start one that exists, and resume only one that
    exists, is unfinished and has the settings this command gives. Before Ray starts; creates nothing
    but the study's lock, which it holds for the driver (p["lock"]; none on a dry run).

    Sets p["resume"]: the study's MLflow run to continue, or None for a new study.
    """
    from filelock import Timeout

    from tracking import store
    from study.study import hold_lock, settings

    storage = Path(args.storage).resolve()
    name, where = p["study"], f"study {p['study']!r} in {storage}"
    try:
        p["lock"] = hold_lock(storage, name, create=not args.dry_run)
    except Timeout:
        raise BadInput(f"{where} is running in another process; wait for it, or stop it and pass --resume") from None
    uri = store.resolve_uri(args.tracking_uri)
    run = store.find_study(uri, name, str(storage))
    tune_dir = storage / "tune" / name
    p["resume"] = None
    if not args.resume:
        if run is not None or tune_dir.exists():
            found = f"MLflow run {run.info.run_id}, {run.info.status}" if run else f"Ray Tune state {tune_dir}"
            raise BadInput(f"{where} already exists ({found}): pass --resume to continue it, "
                           "or choose another --experiment or --storage for a new study")
        return
    if run is None:
        if tune_dir.exists():
            raise BadInput(f"--resume: {tune_dir} holds {where}, but {uri} has no MLflow run of it "
                           "(was it started with another --tracking-uri?)")
        raise BadInput(f"--resume: there is no {where} to resume (MLflow {uri})")
    if run.info.status == "FINISHED":
        raise BadInput(f"--resume: {where} has finished (MLflow run {run.info.run_id}): nothing to resume; "
                       "choose another --experiment or --storage for a new study")
    given = {k: str(v)[:6000] for k, v in settings(args, space, p).items()}
    ignored = {"storage", "data_read"} | (set() if args.max_concurrent else {"max_concurrent"})
    flags = ["space_file", "smoke", "num_samples", "max_concurrent", "data", "skip_invalid"]  # named first: a
    for key in sorted((set(given) | set(run.data.params)) - ignored,  # changed flag also changes constants
                      key=lambda k: (flags.index(k) if k in flags else len(flags), k)):
        before, now = run.data.params.get(key, "(none)"), given.get(key, "(none)")
        if before != now:
            raise BadInput(f"--resume: {where} was started with {key}={before}, this command gives {key}={now}: "
                           "resume with the same space file and flags, or start a new study with another "
                           "--experiment or --storage")
    p["resume"] = run


def _gpus() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def print_plan(p: dict, space) -> None:
    ex = p["example"]
    print(f"study {p['study']!r} from {space.path}")
    print(f"  {p['num_samples']} trials, {p['max_concurrent']} at a time, "
          f"{p['workers_per_trial']} {p['device']} worker(s) per trial x {p['cpus_per_worker']} CPU")
    print(f"  searched: {', '.join(f'{k}={v}' for k, v in space.space.items())}")
    budget = ex.batch_size * (ex.stage1_steps + ex.stage2_steps)
    print(f"  per trial: stage 1 {ex.stage1_steps} steps + stage 2 {ex.stage2_steps} steps at batch "
          f"{ex.batch_size} ({budget:,} samples), eval on {ex.eval_samples or 'all'} held-out samples")
    print(f"  cost is logged per trial as gpu_hours (device-hours / {ex.devices_per_node} per node) and "
          f"dollars (${ex.price_per_node_hour}/node-hour)")
    print(f"  example trial: {ex}")
    if p.get("resume") is not None:
        print(f"  resumes the study's MLflow run {p['resume'].info.run_id} ({p['resume'].info.status}): "
              "finished and failed trials are kept, interrupted ones run again")
    if p.get("data") is not None:
        print_data(p["data"])


def print_data(report, limit: int = 10) -> None:
    files = ", ".join(f"{name} {n:,}" for name, n in report.counts.items())
    print(f"  data: {report.root} ({files} records)")
    skipped = report.skipped()
    if not skipped:
        print("  data: every record is valid")
        return
    print(f"  data: --skip-invalid drops {len(skipped)} of {sum(report.counts.values()):,} records:")
    for s in skipped[:limit]:
        rid = repr(s["id"]) if s["id"] is not None else f"#{s['index']}"
        print(f"    {s['file']} record {rid}: {'; '.join(s['reasons'])}")
    if len(skipped) > limit:
        print(f"    ... and {len(skipped) - limit} more")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        from study import space as spaces

        space = spaces.load(args.space)
        p = plan(args, space)
        p["data"] = check_data(args, space)
        check_resume(args, space, p)
    except (BadInput, SpaceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_plan(p, space)
    if args.dry_run:
        return 0
    from study.study import run_study

    return run_study(args, space, p)


if __name__ == "__main__":
    sys.exit(main())
