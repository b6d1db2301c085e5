"""Memory and speed of the data path at real scale (BENCHMARKS.md, "Data at scale").

    python -m bench.data_scale [--sizes 1000 10000 50000] [--steps 50] [--work DIR]

For generated LLaVA-Instruct-shaped datasets (zoo.llava_like: 336-px JPEGs of several
aspect ratios, two conversations per image, long multi-turn answers) of each size:
- the dataset check (trainables.prepare, a dry run: every image decoded, every record
  tokenized) on 1 process and on 2, with images/s, its verdict cache emptied first;
- the shard build (the check run for real: it writes the shards trials read);
- 50 stage-2 steps of a trial's worker loop (LoRA on the cluster-shapes models: a
  Vicuna-7B-shaped LLM and a CLIP-L/14-336-shaped tower, 576 image tokens, batch 8, one
  loader process), each in a fresh process: peak RSS of the training process and of its
  loader process, and samples/s. The goal: peak RSS flat in the number of records.
Then, side by side on the synthetic world with the zoo's `1m` model (batch 32, 1 thread):
the streaming loader against the in-memory path it replaced (every sample's tokens and
preprocessed pixels decoded up front and held in RAM), alternating runs, samples/s of each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

from bench import result_line, run_child

SHAPES = dict(model_size="vicuna-7b-tiny", vision_tower="clip-l14-336-tiny", image_size=336, max_length=2048)


def generate(work: Path, n: int) -> Path:
    from zoo import llava_like

    root = work / f"llava-like-{n}"
    if not (root / "train.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        llava_like.write(root, records=n, eval_records=min(200, n // 10), captions=0)
    return root


def timed_check(root: Path, processes: int, storage: Path | None) -> tuple[float, int]:
    """(seconds, images) of one check; the image verdict cache is emptied first so every image is decoded."""
    from trainables.config import TrialConfig
    from trainables.data.check import verdict_cache
    from trainables.prepare import prepare

    verdict_cache(root / "images").unlink(missing_ok=True)
    t0 = time.perf_counter()
    report, plan = prepare(root, [TrialConfig(**SHAPES)], storage, write=storage is not None, processes=processes,
                           progress=False)
    seconds = time.perf_counter() - t0
    assert plan is not None, report.first_error_line()
    return seconds, len(list((root / "images").iterdir()))


def plan_file(root: Path, storage: Path, shapes: bool, batch: int) -> Path:
    """The study's side: the check (shards written) in this process, its DataPlan saved as JSON for the worker,
    which, as in a study, never reads the dataset's JSON."""
    from dataclasses import asdict

    from trainables.config import TrialConfig
    from trainables.prepare import prepare

    cfg = TrialConfig(**(SHAPES if shapes else {"model_size": "1m"}), batch_size=batch)
    report, data = prepare(root, [cfg], storage, progress=False)
    assert data is not None, report.first_error_line()
    out = storage / "plan.json"
    out.write_text(json.dumps(asdict(data)))
    return out


def load_plan(path: str):
    from trainables.data.check import DataPlan, Split

    raw = json.loads(Path(path).read_text())
    splits = {key: {name: Split(**{**s, "dropped": tuple(s["dropped"])}) for name, s in by.items()}
              for key, by in raw["splits"].items()}
    return DataPlan(raw["root"], splits, raw["holdout"], raw["stage1"])


def train_once(plan: str, steps: int, storage: str, shapes: bool, in_memory: bool, batch: int) -> dict:
    """In this process, a worker: `steps` stage-2 LoRA steps as a trial's worker runs them; peak RSS and samples/s."""
    import socket

    import torch
    import torch.distributed as dist

    from trainables import worker
    from trainables.config import TrialConfig
    from trainables.methods import METHODS, apply_stage

    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = TrialConfig(**(SHAPES if shapes else {"model_size": "1m"}), batch_size=batch, stage1_steps=0,
                      stage2_steps=steps, loader_workers=1, checkpoint_every=0)
    ctx = worker.setup(cfg, 0, 1, torch.device("cpu"), load_plan(plan), Path(storage))
    base, _ = worker.stage1(ctx)
    m = METHODS["lora"]
    model, _ = apply_stage(m.load(base, cfg), m.stage2, cfg, m.wrap)
    dataset = ctx.dataset("train")
    if in_memory:  # the path this replaced: every sample decoded and preprocessed up front, held in RAM
        dataset = [dataset[i] for i in range(len(dataset))]
        cfg = cfg.replace(loader_workers=0)
        ctx.cfg = cfg
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    _, seconds, _ = worker.train(ctx, model, worker.param_groups(model, cfg), dataset, steps, "stage2")
    return {"samples_per_s": batch * steps / seconds, "seconds": seconds, "samples": len(dataset),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
            "rss_before_training_mb": rss_before,
            "loader_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10}


def train(root: Path, steps: int, storage: Path, shapes: bool, in_memory: bool = False, batch: int = 8) -> dict:
    plan = plan_file(root, storage, shapes, batch)
    cmd = [sys.executable, "-m", "bench.data_scale", "--one", str(plan), "--steps", str(steps), "--storage",
           str(storage), "--batch", str(batch)] + (["--shapes"] if shapes else []) + (["--in-memory"] if in_memory else [])
    return run_child(cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data_scale", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--work", default="/tmp/mmscale-data-scale", help="where datasets and shards go (reused)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of the world's A/B")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child: one training run, given the study's DataPlan
    p.add_argument("--storage", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--shapes", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(result_line(train_once(args.one, args.steps, args.storage, args.shapes, args.in_memory,
                                                args.batch)), flush=True)
        return 0
    import zoo
    from zoo import shapes

    zoo.ensure_zoo(), zoo.ensure_world(), shapes.ensure_shapes()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    timed_check(generate(work, min(args.sizes)), 2, None)  # imports and the tokenizer's first load: not timed
    for n in args.sizes:
        root = generate(work, n)
        one, images = timed_check(root, 1, None)
        two, _ = timed_check(root, 2, None)
        storage = work / f"storage-{n}"
        shutil.rmtree(storage, ignore_errors=True)
        build, _ = timed_check(root, 2, storage)
        t = train(root, args.steps, storage, shapes=True)
        row = dict(records=n, images=images, check_1proc_s=one, check_2proc_s=two, images_per_s_2proc=images / two,
                   check_speedup=one / two, build_s=build, **t)
        rows.append(row)
        print(json.dumps(row), flush=True)
    world_storage = work / "storage-world"
    shutil.rmtree(world_storage, ignore_errors=True)
    ab = {"streaming": [], "in-memory": []}
    for _ in range(args.repeats):  # alternating, so drift of the machine hits both alike
        for kind in ab:
            ab[kind].append(train(zoo.world_dir(), args.steps, world_storage, shapes=False,
                                  in_memory=kind == "in-memory", batch=32))
    print("\n| records | images | check, 1 process (s) | check, 2 processes (s) | speed-up | images/s (2 proc) | "
          "shard build (s) | peak RSS, training (MB) | peak RSS, loader (MB) | stage-2 samples/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['records']:,} | {r['images']:,} | {r['check_1proc_s']:.1f} | {r['check_2proc_s']:.1f} | "
              f"{r['check_speedup']:.2f}x | {r['images_per_s_2proc']:.0f} | {r['build_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['loader_peak_rss_mb']:.0f} | {r['samples_per_s']:.1f} |")
    if len(rows) > 1:
        print(f"\npeak RSS (training process) at {rows[-1]['records']:,} records / at {rows[0]['records']:,}: "
              f"{rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}")
    print("\n| synthetic world, zoo 1m, batch 32, 1 thread | samples/s per run | peak RSS (MB) |")
    print("|---|---|---|")
    for kind, runs in ab.items():
        speeds = ", ".join(f"{r['samples_per_s']:.1f}" for r in runs)
        print(f"| {kind} | {speeds} | {max(r['peak_rss_mb'] for r in runs):.0f} |")
    ratios = [s["samples_per_s"] / m["samples_per_s"] for s, m in zip(ab["streaming"], ab["in-memory"])]
    print(f"\nstreaming / in-memory samples/s, pair by pair: {', '.join(f'{x:.3f}' for x in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
