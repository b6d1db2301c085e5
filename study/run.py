"""Run a study: a Ray Tune search (Optuna) whose trials are Ray Train + DeepSpeed LLaVA tunings.

    python -m study.run search_spaces/lora.py [--smoke] [--num-samples N] [--max-concurrent K]
        [--tracking-uri URI] [--experiment NAME] [--storage DIR] [--address ADDR]
        [--data DIR [--skip-invalid]] [--stage1-data DIR] [--budget-gpu-hours H] [--budget-dollars D]
        [--resume] [--dry-run]

Exit 0 when at least one trial finished (failed trials are counted and their MLflow runs
say why), 2 on bad input (one `error:` line naming the file / record / key / flag), 1 otherwise.
The dataset (`--data`, else the synthetic world) is checked whole before Ray starts (and by
--dry-run) with the trials' own code (trainables.prepare): a bad record is bad input, unless
--skip-invalid drops it (the study's MLflow run lists what was dropped).
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
# Tune's strict metric check wants every result to hold every searched and scheduled metric; ours hold what their
# moment has (an interim evaluation, or the final result), and study.space checked the metrics' names up front.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

from study.plan import BadInput  # noqa: E402
from study.space import SpaceError  # noqa: E402

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we promise one line
        raise BadInput(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m study.run", description=__doc__.splitlines()[0])
    p.add_argument("space", help="search-space file (Python; it runs as code)")
    p.add_argument("--num-samples", type=int, help="configurations to run, each at the file's SEEDS seeds "
                   "(default: the file's NUM_SAMPLES)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the devices allow)")
    p.add_argument("--smoke", action="store_true", help="smallest budget that still runs every step (at most "
                   "3 configurations x 2 seeds)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the study's name)")
    p.add_argument("--storage", default="studies", help="Ray results, stage-1 cache, shards (default ./studies)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: local)")
    p.add_argument("--data", help="a LLaVA-format dataset directory instead of the synthetic world")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop the dataset's invalid records (logged as data/skipped.json) instead of stopping")
    p.add_argument("--stage1-data", help="a LLaVA-format directory of caption pairs for stage 1 (e.g. LCS-558K), "
                                         "when the dataset has no captions.json")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted study of this name in --storage (the same command otherwise)")
    p.add_argument("--budget-gpu-hours", type=float, metavar="H",
                   help="launch trials only while spent + running forecasts stay within H GPU-hours per node")
    p.add_argument("--budget-dollars", type=float, metavar="D",
                   help="the same in dollars (GPU-hours x the trials' price per node-hour)")
    p.add_argument("--dry-run", action="store_true", help="check everything, print the plan and the cost "
                                                          "forecast, and exit")
    args = p.parse_args(argv)
    for flag in ("num_samples", "max_concurrent"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise BadInput(f"--{flag.replace('_', '-')}={value} should be at least 1")
    for flag in ("budget_gpu_hours", "budget_dollars"):
        value = getattr(args, flag)
        if value is not None and not (value > 0 and value != float("inf")):
            raise BadInput(f"--{flag.replace('_', '-')}={value} should be a positive number")
    return args


def main(argv: list[str] | None = None) -> int:
    from study.plan import make_plan, print_plan

    try:
        args = parse_args(argv)
        from study import space as spaces

        space = spaces.load(args.space)
        plan, lock = make_plan(args, space)
    except (BadInput, SpaceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_plan(plan, space)
    if args.dry_run:
        return 0
    from study.study import run_study

    return run_study(plan, space, lock)


if __name__ == "__main__":
    sys.exit(main())
