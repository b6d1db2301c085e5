"""The per-worker body of a trial: setup -> stage 1 -> stage 2 -> evaluate -> report.

Runs on every Ray Train worker (one data-parallel rank each) under DeepSpeed,
which reuses the process group Ray Train set up (gloo on CPU, NCCL on GPU).
Rank 0 writes to the trial's MLflow run (per-step loss, final metrics, adapter)
before the last report, so nothing is lost if the trial actor is stopped after it.
Stage 2 is checkpointed every `checkpoint_every` steps (trainables.checkpoint); when
a worker dies, Ray Train restarts the group and stage 2 resumes from the latest one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainables import model_card
from trainables.config import TrialConfig
from trainables.data.check import DataPlan
from trainables.data.loader import Collate, SplitDataset, train_loader
from trainables.evaluate import score_details
from trainables.methods import METHODS, STAGE1, apply_stage, check_stage, dir_mb
from trainables.timing import Phases


@dataclass
class Ctx:
    cfg: TrialConfig
    rank: int
    world: int
    device: torch.device
    processor: object
    data: DataPlan   # the study's checked data: its shards per tokenizer and split
    storage: Path    # the study's storage (stage-1 cache)
    log: object      # tracking.trial_log.TrialLog on rank 0, else None
    name: str = ""
    image_tokens: int = 0  # features (and <image> tokens) per image for this trial's tower and method
    report: object = None  # ray.train.report in a Ray Train worker (every rank calls it), else None
    phases: Phases = field(default_factory=Phases)  # where this rank's wall time goes (trainables.timing)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def dataset(self, split: str, limit: int = 0) -> SplitDataset | None:
        """One split of the study's data for this trial's tokenizer (None when the dataset has none)."""
        from trainables.data.shards import tokenizer_key

        found = self.data.split(tokenizer_key(self.tokenizer), split)
        if found is None:
            return None
        if not found.shard:
            raise RuntimeError(f"split {split} has no shard: the study's data check ran as a dry run")
        dataset = SplitDataset(found, self.processor, self.cfg.image_aspect)
        if limit and limit < len(dataset):
            dataset.rows = dataset.rows[:limit]
        return dataset

    def collate(self, left: bool = False) -> Collate:
        tok = self.tokenizer
        return Collate(tok.pad_token_id, tok.convert_tokens_to_ids("<image>"), self.image_tokens,
                       self.cfg.max_length, left)

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[{self.name} {self.cfg.method} {self.cfg.model_size}] {msg}", flush=True)


def setup(cfg: TrialConfig, rank: int, world: int, device, data: DataPlan, storage: Path, log=None,
          name: str = "trial") -> Ctx:
    from trainables.model import build_processor, image_tokens

    processor = build_processor(cfg)
    return Ctx(cfg, rank, world, device, processor, data, Path(storage), log, name, image_tokens(cfg, processor))


def deepspeed_config(cfg: TrialConfig, world: int) -> dict:
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": cfg.use_gpu},
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam needs CUDA
        "steps_per_print": 10**9,
    }


def warmup_cosine(steps: int, warmup_ratio: float):
    warm = max(1, int(steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return factor


def train(ctx: Ctx, model, groups: list[dict], dataset, steps: int, stage: str,
          saver=None, resume: Path | None = None, interim=None) -> tuple[object, float, float]:
    """Train `steps` DeepSpeed steps on `dataset`; returns (engine, seconds, last mean loss).

    `saver` (a checkpoint.Saver) checkpoints along the way; with `resume` (a checkpoint
    directory of this trial) the fresh engine is restored from it and training goes on
    after its step, on the batches an uninterrupted run would see there. `interim(engine, step,
    seconds)` -> metrics (or None when not due) runs an interim evaluation; its metrics are
    reported (with the checkpoint when one is due at that step). Its time is not training time.
    """
    from trainables import checkpoint, ds_ops

    cfg = ctx.cfg
    with ctx.phases("ds_init"):
        import deepspeed

        ds_ops.prepare()  # before DeepSpeed's first initialize in this process: no JIT op, no lock to wait on
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, cfg.warmup_ratio))
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                          config=deepspeed_config(cfg, ctx.world), dist_init_required=False)
        engine.train()
    done = checkpoint.Progress()
    if resume is not None:
        with ctx.phases("checkpoint"):
            done = checkpoint.restore(resume, engine, cfg, ctx.rank, ctx.world)
        ctx.say(f"{stage}: resumed from the checkpoint at step {done.step}/{steps} ({resume.name})")
    with ctx.phases("stage1_training" if stage == "stage1" else "stage2_training"):
        return _steps(ctx, engine, dataset, steps, stage, done, saver, interim)


def _steps(ctx: Ctx, engine, dataset, steps: int, stage: str, done, saver, interim) -> tuple[object, float, float]:
    """`train`'s loop, from the step after `done`."""
    from trainables import checkpoint

    cfg = ctx.cfg
    dtype = torch.bfloat16 if cfg.use_gpu else torch.float32
    window = max(1, steps // 10)  # steps per progress line, and the losses final_train_loss averages
    losses, t0 = done.losses, time.perf_counter() - done.seconds
    batches = train_loader(dataset, cfg.batch_size, ctx.rank, ctx.world, cfg.seed, steps, ctx.collate(),
                           cfg.loader_workers, start=done.step)
    for step, batch in enumerate(batches, start=done.step):
        batch.pop("index")
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        value = loss.detach().float()
        if ctx.world > 1:
            dist.all_reduce(value)
            value /= ctx.world
        value = value.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{stage}: loss is {value} at step {step}")
        losses.append(value)
        if ctx.log is not None:
            ctx.log.metric(f"{stage}_loss" if stage != "stage2" else "train_loss", value, step)
        if (step + 1) % window == 0 or step + 1 == steps:
            ctx.say(f"{stage} step {step + 1}/{steps} loss {sum(losses[-window:]) / len(losses[-window:]):.4f}")
        found = None
        if interim is not None:
            started = time.perf_counter()
            with ctx.phases("interim_evaluation"):
                found = interim(engine, step + 1, started - t0)
            t0 += time.perf_counter() - started  # evaluation is not charged as training
        if saver is not None and saver.due(step + 1, steps):
            if ctx.log is not None:
                ctx.log.flush()  # every step up to a checkpoint is in MLflow before a resume can start after it
            with ctx.phases("checkpoint"):
                size = saver.save(engine, checkpoint.Progress(step + 1, losses[-window:], time.perf_counter() - t0),
                                  found or {})
            ctx.say(f"{stage}: checkpoint at step {step + 1}/{steps} ({size:.2f} MB per rank)")
        elif found is not None and ctx.report is not None:
            ctx.report(found)
    seconds = time.perf_counter() - t0
    tail = losses[-window:]
    return engine, seconds, sum(tail) / len(tail)


def stage1_steps(ctx: Ctx) -> int:
    """Stage-1 steps this trial computes: none for single-stage methods (MMA starts from the assembled
    model) or when the study has no caption pairs (the study then plans stage1_steps 0 and says so)."""
    cfg = ctx.cfg
    return cfg.stage1_steps if METHODS[cfg.method].two_stage and ctx.data.stage1 else 0


def stage1_key(ctx: Ctx) -> str:
    """Stage 1 depends only on these; trials sharing them share its result (DESIGN.md)."""
    import hashlib

    import zoo
    from trainables.data.shards import tokenizer_key
    from trainables.model import llm_id, vision_id

    cfg = ctx.cfg
    captions = ctx.data.split(tokenizer_key(ctx.tokenizer), "captions")
    data = [captions.shard, len(captions.dropped), hash_of(captions.dropped)] if captions else "none"
    key = dict(llm=llm_id(cfg.model_size), vision=vision_id(cfg), image_size=cfg.image_size,
               steps=stage1_steps(ctx), lr=cfg.stage1_lr, batch=cfg.batch_size, seed=cfg.seed,
               captions=data, bf16=cfg.use_gpu, zoo=zoo.ZOO_VERSION, max_length=cfg.max_length,
               image_tokens=ctx.image_tokens, aspect=cfg.image_aspect)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def hash_of(values) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()[:16]


def stage1(ctx: Ctx) -> tuple[Path, dict]:
    """The stage-1 LLaVA checkpoint (projector aligned on captions), computed once per key.

    Rank 0 holds the key's lock while the trial computes it (zoo.cache), so a
    concurrent trial with the same key waits and then reuses it; the checkpoint is
    built in a temporary directory from the start and renamed into place whole.
    """
    from trainables.model import build_llava, gathered_state
    from zoo import cache

    cfg = ctx.cfg
    target = ctx.storage / "stage1" / stage1_key(ctx)
    waiting = lambda: ctx.say(f"stage 1: another trial is computing {target.name}; waiting to reuse it")  # noqa
    with ctx.phases("stage1_cache_read"), cache.locked(target, waiting) if ctx.rank == 0 else contextlib.nullcontext():
        flag = [target.exists()]
        if ctx.world > 1:
            dist.broadcast_object_list(flag, src=0)
        if not flag[0]:
            with ctx.phases("stage1_build"), cache.building(target) if ctx.rank == 0 else contextlib.nullcontext() as tmp:
                steps = stage1_steps(ctx)
                ctx.say(f"stage 1: aligning the projector ({steps} steps), cached as {target.name}")
                model = build_llava(cfg, ctx.processor)
                model, counts = apply_stage(model, STAGE1)
                seconds, loss, state = 0.0, float("nan"), model.state_dict()
                if steps:
                    params = [p for p in model.parameters() if p.requires_grad]
                    engine, seconds, loss = train(ctx, model, [{"params": params, "lr": cfg.stage1_lr}],
                                                  ctx.dataset("captions"), steps, "stage1")
                    state = gathered_state(engine, cfg.zero_stage, ctx.rank)
                    del engine
                if ctx.rank == 0:
                    model.save_pretrained(tmp, state_dict=state)
                    ctx.processor.save_pretrained(tmp)
                    meta = dict(seconds=seconds, world=ctx.world, loss=loss,
                                trainable_params=sum(counts.values()) if steps else 0)
                    (tmp / "stage1.json").write_text(json.dumps(meta))
                del model
        if ctx.world > 1:
            dist.barrier()
    return target, json.loads((target / "stage1.json").read_text())


def param_groups(model, cfg: TrialConfig) -> list[dict]:
    """The projector at its own learning rate (LLaVA's recipe), everything else that trains at `lr`."""
    from trainables.methods import part_of

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    proj = [p for n, p in trainable if part_of(n) == "projector"]
    rest = [p for n, p in trainable if part_of(n) != "projector"]
    return [g for g in ({"params": rest, "lr": cfg.lr}, {"params": proj, "lr": cfg.projector_lr}) if g["params"]]


def mixed(ctx: Ctx):
    """Stage 2's data: the instruction split with a fraction `mix_ratio` of language-only samples (the
    paper's data mixing), drawn seeded from text.json; returns (dataset, the mix as used). The study
    refuses mix_ratio > 0 without text.json and says when text.json is too small for it."""
    import numpy as np

    cfg = ctx.cfg
    train, text = ctx.dataset("train"), ctx.dataset("text")
    if cfg.mix_ratio <= 0 or text is None:
        return train, 0.0
    n_text = min(len(text), round(len(train) * cfg.mix_ratio / (1 - cfg.mix_ratio)))
    keep = np.sort(np.random.default_rng(cfg.seed).choice(len(text), n_text, replace=False))
    return torch.utils.data.ConcatDataset([train, torch.utils.data.Subset(text, keep.tolist())]), \
        n_text / (len(train) + n_text)


class StoppedEarly(Exception):
    """The study's scheduler stopped this trial (its run is tagged `stopped_early`): the workers end here, at
    the next interim evaluation, instead of training on until Ray kills them, and log nothing more."""


def stop_requested(ctx: Ctx) -> bool:
    """Rank 0 asks the trial's run whether the scheduler stopped it; every rank gets the same answer."""
    flag = [bool(ctx.log is not None and ctx.log.stopped_early())]
    if ctx.world > 1:
        dist.broadcast_object_list(flag, src=0)
    return flag[0]


def interim_evaluation(ctx: Ctx, spent_seconds: float):
    """`train`'s interim callable for stage 2 (None when the trial has none): every `interim_every` steps
    before the last, the score on the first `interim_samples` eval samples, logged as `interim_score` and
    returned for Ray Tune with the step and the cost spent so far (stage 1's share included), which is what
    a scheduler stopping the trial there leaves it with."""
    cfg = ctx.cfg
    if not cfg.interim_every:
        return None
    subset = ctx.dataset("eval", limit=cfg.interim_samples)
    collate = ctx.collate(left=True)

    def interim(engine, step: int, seconds: float) -> dict | None:
        if step % cfg.interim_every or step >= cfg.stage2_steps:
            # none at the last step: the final result carries it (interim_score = score), for a scheduler that
            # reached its last rung would stop the trial on an interim report before the score was reported
            return None
        if step > cfg.interim_every and stop_requested(ctx):  # decided on an earlier interim report
            raise StoppedEarly(f"stopped early by the study's scheduler before stage-2 step {step}")
        found = score_details(engine.module, subset, collate, ctx.tokenizer, cfg.max_new_tokens, ctx.device,
                              ctx.rank, ctx.world, synced=cfg.zero_stage == 3, batch_size=cfg.eval_batch_size)
        engine.train()
        if ctx.log is not None:
            ctx.log.metric("interim_score", found.score, step)
            ctx.log.flush()  # in MLflow before Tune hears it: a scheduler may stop the trial on it
        ctx.say(f"stage2 step {step}/{cfg.stage2_steps}: interim score {found.score:.1f} "
                f"on {found.questions} samples")
        return {"interim_score": found.score, "stage2_step": step,
                **cost(cfg, spent_seconds + seconds, ctx.world)}

    return interim


def stage2(ctx: Ctx, base: Path, saver=None, resume: Path | None = None, spent_seconds: float = 0.0):
    """Visual instruction tuning of the stage-1 model with the trial's method (checkpointed by `saver`,
    continued from the checkpoint `resume`: see `train`; interim evaluations when the trial has them, with
    `spent_seconds` of earlier device time per worker); returns (engine, counts, seconds, loss, mix used)."""
    cfg = ctx.cfg
    method = METHODS[cfg.method]
    with ctx.phases("model_load"):
        model = method.load(base, cfg)
        model, counts = apply_stage(model, method.stage2, cfg, method.wrap)
    with ctx.phases("data_load"):
        data, mix = mixed(ctx)
    ctx.say(f"stage 2: {cfg.method} on {len(data):,} samples ({mix:.0%} language-only), "
            f"{sum(counts.values()):,} trainable params")
    engine, seconds, loss = train(ctx, model, param_groups(model, cfg), data, cfg.stage2_steps, "stage2",
                                  saver, resume, interim_evaluation(ctx, spent_seconds))
    check_stage(engine.module, method.stage2)
    return engine, counts, seconds, loss, mix


def peak_memory_gb(device) -> tuple[float, str]:
    """Accelerator peak allocation on GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "gpu_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss"


def evaluate(ctx: Ctx, engine) -> dict[str, float]:
    """`score` on the held-out multimodal split (with its number of questions `score_n`, its 95% Wilson
    interval `score_ci_low`/`score_ci_high`, and how many multiple-choice answers named no option:
    `unparsed`) and, where the dataset has one, `text_score` on its language-only split:
    whether tuning kept the LLM's text skill (the paper's data-mixing question). Where the questions name two
    types or more (records' `category`), each type's score too, as `score/<category>` with its `_n` and interval."""
    from trainables.evaluate import MAX_CATEGORIES

    cfg = ctx.cfg
    result = {}
    for metric, split in (("score", "eval"), ("text_score", "text_eval")):
        held_out = ctx.dataset(split, limit=cfg.eval_samples)
        if held_out is None:
            continue
        with ctx.phases("evaluation"):
            found = score_details(engine.module, held_out, ctx.collate(left=True), ctx.tokenizer, cfg.max_new_tokens,
                                  ctx.device, ctx.rank, ctx.world, synced=cfg.zero_stage == 3,
                                  batch_size=cfg.eval_batch_size, workers=cfg.loader_workers)
        types = len(found.by_category())
        if types > MAX_CATEGORIES:
            ctx.say(f"{split}: {types} question types, more than the {MAX_CATEGORIES} logged one by one: "
                    f"no {metric}/<category> metrics")
        result.update(found.metrics(metric))
        if metric == "score":
            result.update(multiple_choice=found.multiple_choice, unparsed=found.unparsed)
    return result


def save_artifact(ctx: Ctx, engine, out: Path) -> float:
    """Write the method's artifact (a collective under ZeRO-3); its size in MB, the same on every rank."""
    with ctx.phases("artifact_save"):
        METHODS[ctx.cfg.method].save(ctx, engine, out)
    size = [dir_mb(out) if ctx.rank == 0 else 0.0]
    if ctx.world > 1:
        dist.broadcast_object_list(size, src=0)
    return size[0]


def cost(cfg: TrialConfig, seconds: float, world: int) -> dict[str, float]:
    """The paper's convention: device-hours / devices per node, priced per node-hour."""
    hours = seconds * world / 3600 / cfg.devices_per_node
    return {"gpu_hours": hours, "dollars": hours * cfg.price_per_node_hour}


def run(cfg: TrialConfig, rank: int, world: int, device, data: DataPlan, storage: Path, log=None,
        name: str = "trial", saver=None, resume: Path | None = None, tags: dict | None = None,
        report=None, phases: Phases | None = None) -> dict:
    """The whole trial on one rank; returns the final metrics (identical on every rank).

    `data` is the study's checked data, `storage` its storage (stage-1 cache); `saver`
    checkpoints stage 2; `resume` is the checkpoint a restarted worker goes on from
    (stage 1 then comes from its cache); `tags` go on the trial's run beside its own; `report(metrics)`
    hands interim results to Ray Tune (every rank calls it); `phases` has timed what came before (rank 0 logs
    every phase's seconds last, trainables.timing)."""
    torch.manual_seed(cfg.seed)
    phases = phases or Phases()
    with phases("model_load"):
        ctx = setup(cfg, rank, world, device, data, storage, log, name)
    ctx.report, ctx.phases = report, phases
    base, s1 = stage1(ctx)
    s1_seconds = s1["seconds"] * s1["world"] / world  # charged to every trial that uses it
    engine, counts, seconds, loss, mix = stage2(ctx, base, saver, resume, s1_seconds)
    result = evaluate(ctx, engine)
    peak, source = peak_memory_gb(device)
    peak_t = torch.tensor([peak], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
    result.update(cost(cfg, s1_seconds + seconds, world))
    result.update({
        "stage1_gpu_hours": cost(cfg, s1_seconds, world)["gpu_hours"],
        "stage2_gpu_hours": cost(cfg, seconds, world)["gpu_hours"],
        "trainable_params": sum(counts.values()),
        "stage1_trainable_params": s1["trainable_params"],
        "peak_mem_gb": float(peak_t.item()),  # what it measures is the tag peak_mem_source
        "samples_per_s": cfg.batch_size * cfg.stage2_steps / seconds,
        "final_train_loss": loss,
        "mix_ratio_used": mix,
    })
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / METHODS[cfg.method].artifact
        result["artifact_mb"] = save_artifact(ctx, engine, artifact)
        ctx.say(f"score {result['score']:.1f}, {result['gpu_hours']:.2e} GPU-hours per node, "
                f"{result['artifact_mb']:.2f} MB saved")
        if log is not None:
            with phases("mlflow_log"):
                model_card.write(artifact, cfg, result, METHODS[cfg.method].base_of(artifact) or str(base),
                                 **log.about())
                log.artifacts(artifact, artifact.name)
                log.finish(result, tags={"device": device_name(device), "peak_mem_source": source,
                                         "stage1_checkpoint": str(base), "world_size": world, **(tags or {})})
            log.finish(phases.metrics(), tags={})
    return result


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def node_ids(world: int) -> list[str]:
    """The Ray node of every rank, in rank order (the trial's run says where its workers ran)."""
    import ray

    mine = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [mine]
    every = [None] * world
    dist.all_gather_object(every, mine)
    return every


def train_loop(loop_config: dict) -> None:
    """Ray Train entry point (`train_loop_per_worker`)."""
    entered, phases = time.time(), Phases()
    import ray.train
    import ray.train.torch

    from tracking.trial_log import TrialLog
    from trainables import checkpoint
    from trainables.processes import quiet_exit_requests

    quiet_exit_requests()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(int(loop_config.get("threads", 1)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrialConfig.from_dict(loop_config["trial"])
    # A restarted worker group attaches to the same run again (found by trial id) and goes on logging there.
    log = TrialLog.attach(loop_config["tracking_uri"], loop_config["experiment_id"], loop_config["trial_id"]) \
        if rank == 0 else None
    phases.add("imports", time.time() - entered)
    if log is not None and checkpoint.first_attempt(Path(loop_config["run_dir"])):
        # a restarted worker group or a resumed trial would count its earlier attempts and the time between;
        # a driver's and a worker's clocks may differ on a cluster: never below 0
        phases.add("startup", max(0.0, entered - log.started()))
    saver = checkpoint.Saver(cfg.checkpoint_every, cfg, rank, world)
    try:
        with checkpoint.no_repeats(Path(loop_config["run_dir"])), checkpoint.latest() as resume:
            result = run(cfg, rank, world, ray.train.torch.get_device(), loop_config["data"],
                         Path(loop_config["storage"]), log, name=loop_config["trial_id"], saver=saver,
                         resume=resume, tags={"nodes": ",".join(node_ids(world))}, report=ray.train.report,
                         phases=phases)
    except StoppedEarly as stopped:
        if rank == 0:
            print(f"[{loop_config['trial_id']}] {stopped}", flush=True)
        return
    # The last report, the only one with `score`; what a scheduler judges (interim_score at the step) rides along.
    ray.train.report({**result, "stage2_step": cfg.stage2_steps, **({"interim_score": result["score"]}
                                                                    if cfg.interim_every else {})})
