"""What a trial costs beyond its training (BENCHMARKS.md, "Trial overhead").

    python -m bench.overhead [--steps 250] [--repeats 3] [--methods lora full] [--parallel 1] [--trials 4]
                             [--workers 1 2] [--before REV] [--skip a b c]

(a) Stage-2 samples/s of a trial's worker loop (trainables.worker.train: DeepSpeed ZeRO-2, the streaming
    data path with its loader process, per-step loss logging as in a trial) against a bare loop on the same
    model: plain transformers + PEFT + torch AdamW (the same parameter groups, schedule and gradient clipping),
    the same batches (collated up front, so the bare loop pays no data loading at all), the same threads, no
    Ray, no DeepSpeed. Each run is its own process, the two kinds alternate, so drift of the machine hits both
    alike; the ratio is trial / bare, pair by pair. Goal: >= 0.95. `--parallel 2` runs two of a kind at once,
    as a study's two concurrent trials do on two cores.
(b) A trial's wall time (its MLflow run, start to end) broken into the phases its workers log
    (`time_<phase>_s`, trainables.timing) and what lies around them: from the run's start until the
    worker's loop runs (Tune's trial actor, the TorchTrainer, the worker group, the worker's imports) and
    from the worker's last log until the run ends (teardown). Small studies of `--trials` trials, one at a
    time, on 1 and on 2 workers. Goal: everything but training and evaluation <= 10 s per trial.
(c) What a fresh Python process pays to import what a trial's worker imports, library by library and all
    together (the floor under (b): Ray starts new processes for every trial's controller and workers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import result_line, result_of

REPO = Path(__file__).resolve().parent.parent
MODEL = "1m"
BATCH = 32


def build(method: str, steps: int, storage: str, threads: int):
    """The stage-1 model (cached in `storage`) with `method` applied, as a trial's stage 2 starts it, in a
    one-rank gloo group: what a trial's worker has once Ray Train set up its process group."""
    import torch

    from bench.memory import stage2_model

    torch.set_num_threads(threads)
    ctx, model, _ = stage2_model(method, MODEL, None, steps, BATCH, False, Path(storage), loader_workers=1,
                                 lr=1e-3 if method != "full" else 1e-4)
    return ctx, model


class _Losses:
    """Per-step loss logging as a trial's rank 0 does it (tracking.trial_log.TrialLog.metric), into a list."""

    def __init__(self):
        self.values = []

    def metric(self, key, value, step):
        self.values.append(value)

    def flush(self):
        pass


def trial_loop(method: str, steps: int, storage: str, threads: int) -> dict:
    from trainables import worker

    ctx, model = build(method, steps, storage, threads)
    ctx.log = _Losses()
    _, seconds, loss = worker.train(ctx, model, worker.param_groups(model, ctx.cfg), ctx.dataset("train"), steps,
                                    "stage2")
    return {"samples_per_s": BATCH * steps / seconds, "seconds": seconds, "final_loss": loss}


def bare_loop(method: str, steps: int, storage: str, threads: int) -> dict:
    """transformers + PEFT + torch AdamW, nothing else: the ceiling a trial's loop is measured against."""
    import torch

    from trainables import worker
    from trainables.data.loader import train_loader

    ctx, model = build(method, steps, storage, threads)
    cfg = ctx.cfg
    batches = [b for b in train_loader(ctx.dataset("train"), cfg.batch_size, 0, 1, cfg.seed, steps, ctx.collate())]
    for b in batches:
        b.pop("index")
    groups = worker.param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, worker.warmup_cosine(steps, cfg.warmup_ratio))
    model.train()
    losses = []
    t0 = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    window = max(1, steps // 10)
    return {"samples_per_s": BATCH * steps / seconds, "seconds": seconds,
            "final_loss": sum(losses[-window:]) / window}


def one(kind: str, method: str, steps: int, storage: str, threads: int, parallel: int = 1) -> dict:
    """`parallel` runs of one kind at once, each its own process (as concurrent trials run); their mean samples/s."""
    cmd = [sys.executable, "-m", "bench.overhead", "--one", kind, "--methods", method, "--steps", str(steps),
           "--storage", storage, "--threads", str(threads)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(parallel)]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        results.append(result_of(cmd, proc.returncode, out, err))
    return {"samples_per_s": statistics.mean(r["samples_per_s"] for r in results)}


def loop_ratio(methods: list[str], steps: int, repeats: int, storage: str, threads: int,
               parallel: int = 1) -> list[dict]:
    if parallel > 1:
        one("bare", methods[0], 1, storage, threads)  # the stage-1 cache and shards, before two runs race for them
    rows = []
    for method in methods:
        runs = {"trial": [], "bare": []}
        for _ in range(repeats):
            for kind in runs:
                runs[kind].append(one(kind, method, steps, storage, threads, parallel))
                print(f"  {method} {kind}: {runs[kind][-1]['samples_per_s']:.1f} samples/s", flush=True)
        ratios = [t["samples_per_s"] / b["samples_per_s"] for t, b in zip(runs["trial"], runs["bare"])]
        rows.append({"method": method, "trial": [r["samples_per_s"] for r in runs["trial"]],
                     "bare": [r["samples_per_s"] for r in runs["bare"]], "ratios": ratios})
    return rows


SPACE = """\
from study.space import loguniform

NAME = {name!r}
NUM_SAMPLES = {trials}
FIXED = {{"method": "lora", "model_size": "{model}", "stage1_steps": 30, "stage2_steps": {steps},
         "batch_size": {batch}, "eval_samples": 100, "num_workers": {workers}}}
SPACE = {{"lr": loguniform(1e-4, 1e-2)}}  # stage 1 does not depend on lr: the first trial computes it, the rest read it
"""
PARTS = ("startup", "imports", "model_load", "stage1_cache_read", "stage1_build", "data_load", "ds_init",
         "checkpoint", "artifact_save", "mlflow_log", "unaccounted", "teardown")


def study_breakdown(work: Path, workers: int, trials: int, steps: int, tree: Path = REPO, tag: str = "") -> list[dict]:
    """Run a study of `trials` trials one at a time on `workers` workers with the code in `tree` (this checkout,
    or a worktree of another revision); each trial's phases (seconds) as its run logged them."""
    import shutil

    from mlflow.tracking import MlflowClient

    from trainables.timing import PHASES, WORK, metric

    name = f"overhead-{workers}w{tag}"
    space = work / f"{name}.py"
    space.write_text(SPACE.format(name=name, trials=trials, model=MODEL, steps=steps, batch=BATCH, workers=workers))
    store, uri = work / name, f"sqlite:///{work / name / 'mlflow.db'}"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    cmd = [sys.executable, "-m", "study.run", str(space), "--storage", str(store / "studies"), "--tracking-uri", uri,
           "--max-concurrent", "1"]
    started = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    wall = time.perf_counter() - started
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    rows = []
    for run in client.search_runs([exp.experiment_id], "tags.`mmscale.trial_id` != ''", order_by=["start_time ASC"]):
        m = run.data.metrics
        history = client.get_metric_history(run.info.run_id, "time_overhead_s")
        if not history:  # a trial that did not finish (or a tree without the timings): nothing to break down
            print(f"  run {run.info.run_name}: {run.info.status}, no phase timings; left out", flush=True)
            continue
        logged = history[-1].timestamp / 1000
        row = {p: m.get(metric(p), 0.0) for p in PHASES}
        total = (run.info.end_time - run.info.start_time) / 1000
        row["teardown"] = run.info.end_time / 1000 - logged
        row["unaccounted"] = total - row["teardown"] - sum(row[p] for p in PHASES)
        row.update(total=total, work=sum(row[p] for p in WORK), study_wall=wall, workers=workers)
        row["overhead"] = total - row["work"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250, help="stage-2 steps per run (the default study's trial: 250)")
    p.add_argument("--repeats", type=int, default=3, help="alternating run pairs per method in (a)")
    p.add_argument("--methods", nargs="+", default=["lora", "full"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (a trial's worker: cpus_per_worker)")
    p.add_argument("--parallel", type=int, default=1, help="(a): runs of a kind at once, as concurrent trials run")
    p.add_argument("--trials", type=int, default=4, help="trials per study in (b)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="workers per trial in (b)")
    p.add_argument("--skip", choices=["a", "b", "c"], nargs="+", default=[], help="leave out parts")
    p.add_argument("--before", metavar="REV", help="(b) also for this git revision (a worktree of it; 9778369 or later: "
                                                   "it must log the phase timings), study by study alternating with "
                                                   "this checkout")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mmscale-overhead"))
    p.add_argument("--one", choices=["trial", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--storage", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        loop = trial_loop if args.one == "trial" else bare_loop
        print(result_line(loop(args.methods[0], args.steps, args.storage, args.threads)), flush=True)
        return 0
    import zoo

    zoo.ensure_zoo(), zoo.ensure_world()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if "a" not in args.skip:
        rows = loop_ratio(args.methods, args.steps, args.repeats, str(work / "storage-a"), args.threads, args.parallel)
        print(f"\n| stage 2, zoo {MODEL}, batch {BATCH}, {args.threads} thread(s), {args.steps} steps, "
              f"{args.parallel} run(s) at once | "
              "trial loop (samples/s) | bare loop (samples/s) | trial / bare, pair by pair | mean |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {', '.join(f'{x:.1f}' for x in r['trial'])} | "
                  f"{', '.join(f'{x:.1f}' for x in r['bare'])} | {', '.join(f'{x:.3f}' for x in r['ratios'])} | "
                  f"{statistics.mean(r['ratios']):.3f} |")
    if "b" not in args.skip:
        trees = {"": REPO}
        if args.before:
            trees[f" at {args.before}"] = worktree(work, args.before)
        for workers in args.workers:
            for label, tree in trees.items():  # alternating, so drift of the machine hits both alike
                rows = study_breakdown(work, workers, args.trials, args.steps, tree, "-before" if label else "")
                print(f"\n{workers} worker(s){label}, {len(rows)} trials one at a time (zoo {MODEL}, LoRA, "
                      f"{args.steps} stage-2 steps, batch {BATCH}; study wall time {rows[0]['study_wall']:.0f} s), "
                      "seconds per trial:")
                print("| trial | " + " | ".join(PARTS) + " | work (training + evaluation) | overhead | total |")
                print("|---|" + "---|" * (len(PARTS) + 3))
                for i, r in enumerate(rows + [median_row(rows)]):
                    name = str(i + 1) if i < len(rows) else "median"
                    print(f"| {name} | " + " | ".join(f"{r[p]:.1f}" for p in PARTS) +
                          f" | {r['work']:.1f} | {r['overhead']:.1f} | {r['total']:.1f} |")
    if "c" not in args.skip:
        print("\n| imported in a fresh process | seconds (median of 3) |\n|---|---|")
        for modules in IMPORTS:
            print(f"| {', '.join(modules)} | {import_seconds(modules):.2f} |", flush=True)
    return 0


# What a trial's worker imports (its own modules pull torch and transformers in).
IMPORTS = [("torch",), ("ray.train.torch",), ("mlflow",), ("transformers.models.llava",), ("peft",), ("deepspeed",),
           ("torch", "ray.train.torch", "mlflow", "transformers.models.llava", "peft", "deepspeed", "trainables.worker")]


def import_seconds(modules: tuple[str, ...], repeats: int = 3) -> float:
    """Median wall seconds of `python -c "import ..."` (the interpreter's own start included)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import " + ", ".join(modules)], check=True, capture_output=True,
                       cwd=REPO)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worktree(work: Path, rev: str) -> Path:
    """A detached worktree of `rev` (made once per revision, reused)."""
    out = work / f"tree-{rev}"
    if not out.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(out), rev], check=True,
                       capture_output=True)
    return out


def median_row(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


if __name__ == "__main__":
    sys.exit(main())
