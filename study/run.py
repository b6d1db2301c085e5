"""Run a study: a Ray Tune search (Optuna) whose trials are Ray Train + DeepSpeed LLaVA tunings.

    python -m study.run search_spaces/lora.py [--smoke] [--num-samples N] [--max-concurrent K]
        [--tracking-uri URI] [--experiment NAME] [--storage DIR] [--address ADDR]
        [--data DIR [--skip-invalid]] [--dry-run]

Exit 0 on success, 2 on bad input (one `error:` line naming the file / record / key / flag), 1 otherwise.
A `--data` dataset is checked whole before Ray starts (and by --dry-run): a bad record is
bad input, unless --skip-invalid drops it (the study's MLflow run lists what was dropped).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from study.space import SpaceError

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
