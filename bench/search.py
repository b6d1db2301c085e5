"""How efficiently each search strategy spends: replayed against a full grid measured once (BENCHMARKS.md, "Search").

    python -m bench.search grid [--out bench/search_grid.csv]    # run the grid study once (~25 min on 2 cores)
    python -m bench.search [--table bench/search_grid.csv] [--seeds 5]   # replay the strategies (seconds)

The grid is `search_spaces/search_grid.py` (model size x LoRA rank x alpha/rank x learning
rate, every trial with interim evaluations every 25 stage-2 steps), run by `study.run`; its
trials are kept as a table (bench/search_grid.csv, in the repo): each configuration's
score, measured GPU-hours per node (stage 1's share and stage 2's) and interim scores.
Each strategy then searches the same space with Optuna, and each trial it asks for is a
lookup in the table that costs the GPU-hours that trial took:
- random: Optuna's RandomSampler;
- tpe: TPE on the score alone (what the study did before);
- mo-tpe: multi-objective TPE on (score max, GPU-hours min);
- mo-tpe+asha: the same, with ASHA (grace 100 steps, reduction factor 2; --grace, --reduction) replayed on the
  interim scores: a trial stopped at step s costs stage 1 + s/steps of its stage 2, is told
  to Optuna as PRUNED and stays off the frontier.
A configuration asked for again is answered from the earlier result at no cost, as the study
does. Reported, median over `--seeds` seeds: the compute spent to get within 1 point of the
grid's best score, and the hypervolume of the frontier found (score vs GPU-hours, reference
point: the chance score and the grid's costliest trial) as a fraction of the grid's, at 25% and
50% of the grid's compute, and the compute needed to reach 95% of it.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent
KEYS = ("model_size", "lora_rank", "alpha_per_rank", "lr")
CHANCE = 25.0  # the world's held-out split, text alone (zoo/world.py ANSWER_SPACE)
GRACE, REDUCTION = 100, 2  # search_spaces/cost.py; 50/3 stopped the best trials here (BENCHMARKS.md)


def run_grid(out: Path, storage: Path) -> int:
    """The grid study, then its trials as a CSV table."""
    space = REPO / "search_spaces" / "search_grid.py"
    cmd = [sys.executable, "-m", "study.run", str(space), "--storage", str(storage), "--tracking-uri",
           f"sqlite:///{storage / 'mlflow.db'}"]
    if subprocess.run(cmd).returncode not in (0,):
        return 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("search_grid")
    rows = []
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'"):
        if "mlflow.parentRunId" not in run.data.tags or "score" not in run.data.metrics:
            continue
        p, m = run.data.params, run.data.metrics
        interim = {h.step: h.value for h in client.get_metric_history(run.info.run_id, "interim_score")}
        rows.append({"model_size": p["model_size"], "lora_rank": int(p["lora_rank"]),
                     "alpha_per_rank": float(p["alpha_per_rank"]), "lr": float(p["lr"]), "score": m["score"],
                     "gpu_hours": m["gpu_hours"], "stage1_gpu_hours": m["stage1_gpu_hours"],
                     "stage2_gpu_hours": m["stage2_gpu_hours"], "stage2_steps": int(p["stage2_steps"]),
                     "interim": json.dumps({str(k): v for k, v in sorted(interim.items())})})
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: [str(r[k]) for k in KEYS]))
    print(f"wrote {len(rows)} trials to {out}")
    return 0


def load(table: Path) -> dict[tuple, dict]:
    with open(table) as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        key = (r["model_size"], int(r["lora_rank"]), float(r["alpha_per_rank"]), float(r["lr"]))
        out[key] = {"score": float(r["score"]), "gpu_hours": float(r["gpu_hours"]),
                    "stage1": float(r["stage1_gpu_hours"]), "stage2": float(r["stage2_gpu_hours"]),
                    "steps": int(r["stage2_steps"]),
                    "interim": {int(k): v for k, v in json.loads(r["interim"]).items()}}
    return out


def hypervolume(points: list[tuple[float, float]], ref_cost: float, ref_score: float = CHANCE) -> float:
    """Area of (cost, score) dominated by `points` (cost down, score up) within the reference box.
    Written by hand: a two-objective sweep is a few lines, and Optuna's implementation is private."""
    front = sorted((c, s) for c, s in points if c < ref_cost and s > ref_score)
    area, best = 0.0, ref_score
    for i, (cost, score) in enumerate(front):
        best = max(best, score)
        right = front[i + 1][0] if i + 1 < len(front) else ref_cost
        area += (right - cost) * (best - ref_score)
    return area


class ASHA:
    """Asynchronous successive halving replayed one trial at a time, by the rule of Ray Tune's ASHAScheduler
    (ray/tune/schedulers/async_hyperband.py): at each rung (grace x reduction_factor^k stage-2 steps), a trial
    stops when its interim score is below the (1 - 1/reduction_factor) quantile of the scores recorded there
    before it, then its score is recorded. Replayed by hand: the bench runs no Tune."""

    def __init__(self, max_steps: int, grace: int = GRACE, reduction: int = REDUCTION):
        self.reduction = reduction
        self.rungs, r = [], grace
        while r < max_steps:
            self.rungs.append(r)
            r *= reduction
        self.seen: dict[int, list[float]] = {r: [] for r in self.rungs}

    def stop_step(self, interim: dict[int, float]) -> int | None:
        import numpy as np

        for rung in self.rungs:
            value = interim.get(rung)
            if value is None:
                continue
            recorded = self.seen[rung]
            cutoff = np.nanpercentile(recorded, (1 - 1 / self.reduction) * 100) if recorded else None
            recorded.append(value)
            if cutoff is not None and value < cutoff:
                return rung
        return None


def replay(table: dict, strategy: str, seed: int, budget: float, grace: int = GRACE,
           reduction: int = REDUCTION) -> list[dict]:
    """The trials a strategy runs within `budget` GPU-hours: (cost so far, score or None if stopped, cost)."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    values = {k: sorted({key[i] for key in table}) for i, k in enumerate(KEYS)}
    dists = {k: CategoricalDistribution(v) for k, v in values.items()}
    several = strategy.startswith("mo-")
    sampler = optuna.samplers.RandomSampler(seed=seed) if strategy == "random" else \
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    study = optuna.create_study(sampler=sampler, directions=["maximize", "minimize"] if several else ["maximize"])
    asha = ASHA(next(iter(table.values()))["steps"], grace, reduction) if strategy.endswith("asha") else None
    spent, log, answered = 0.0, [], {}
    for _ in range(10 * len(table)):  # a sampler that only repeats itself ends the search too
        if spent >= budget:
            break
        trial = study.ask(dists)
        key = tuple(trial.params[k] for k in KEYS)
        row = table[key]
        if key in answered:  # asked again: the earlier result (or its stop, told PRUNED again), free
            if answered[key] is None:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, answered[key])
            continue
        stop = asha.stop_step(row["interim"]) if asha else None
        if stop is not None:
            cost = row["stage1"] + row["stage2"] * stop / row["steps"]
            spent += cost
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            answered[key] = None  # study.study.identical_trial: a stopped twin answers a repeat as stopped
            log.append({"spent": spent, "score": None, "cost": cost})
            continue
        spent += row["gpu_hours"]
        values_told = [row["score"], row["gpu_hours"]] if several else row["score"]
        study.tell(trial, values_told)
        answered[key] = values_told
        log.append({"spent": spent, "score": row["score"], "cost": row["gpu_hours"]})
    return log


def summarize(table: dict, strategies: list[str], seeds: int, grace: int = GRACE, reduction: int = REDUCTION) -> str:
    total = sum(r["gpu_hours"] for r in table.values())
    best = max(r["score"] for r in table.values())
    ref_cost = max(r["gpu_hours"] for r in table.values()) * 1.001
    grid_hv = hypervolume([(r["gpu_hours"], r["score"]) for r in table.values()], ref_cost)
    lines = [f"grid: {len(table)} configurations, {total:.4g} GPU-hours per node in all, best score {best:.1f}, "
             f"hypervolume {grid_hv:.4g} (score above chance {CHANCE:g} x GPU-hours below {ref_cost:.3g})", "",
             "| strategy | compute to within 1 point of the best (share of the grid's) | hypervolume at 25% of the "
             "grid's compute | at 50% | compute to 95% of the grid's hypervolume | trials stopped early |",
             "|---|---|---|---|---|---|"]
    for strategy in strategies:
        near, hv25, hv50, to95, stopped = [], [], [], [], []
        for seed in range(seeds):
            log = replay(table, strategy, seed, total, grace, reduction)
            done = [(e["spent"], e["cost"], e["score"]) for e in log]
            near.append(next((s for s, c, sc in done if sc is not None and sc >= best - 1), float("nan")) / total)

            def hv_at(limit):
                return hypervolume([(c, sc) for s, c, sc in done if s <= limit and sc is not None], ref_cost) / grid_hv
            hv25.append(hv_at(0.25 * total))
            hv50.append(hv_at(0.5 * total))
            to95.append(next((s for s, c, sc in done if hv_at(s) >= 0.95), float("nan")) / total)
            stopped.append(sum(e["score"] is None for e in log))
        med = lambda xs: statistics.median(xs)  # noqa: E731
        share = lambda x: "never" if x != x else f"{x:.0%}"  # noqa: E731 - NaN: not reached in most seeds
        name = f"{strategy} (grace {grace}, factor {reduction})" if strategy.endswith("asha") else strategy
        lines.append(f"| {name} | {share(med(near))} | {med(hv25):.0%} | {med(hv50):.0%} | {share(med(to95))} | "
                     f"{med(stopped):g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", default="replay", choices=["replay", "grid"])
    p.add_argument("--table", default=str(REPO / "bench" / "search_grid.csv"))
    p.add_argument("--storage", default="/tmp/mmscale-search-grid", help="where the grid study runs (grid)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--grace", type=int, default=GRACE, help="ASHA's first rung, stage-2 steps")
    p.add_argument("--reduction", type=int, default=REDUCTION, help="ASHA's reduction factor")
    p.add_argument("--strategies", nargs="+", default=["random", "tpe", "mo-tpe", "mo-tpe+asha"])
    args = p.parse_args(argv)
    if args.command == "grid":
        Path(args.storage).mkdir(parents=True, exist_ok=True)
        return run_grid(Path(args.table), Path(args.storage))
    if not Path(args.table).is_file():
        print(f"error: --table {args.table}: no such file (make it with `python -m bench.search grid`)",
              file=sys.stderr)
        return 2
    print(summarize(load(Path(args.table)), args.strategies, args.seeds, args.grace, args.reduction))
    return 0


if __name__ == "__main__":
    sys.exit(main())
