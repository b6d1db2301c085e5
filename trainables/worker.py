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
import itertools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from trainables import data as D
from trainables.config import TrialConfig
from trainables.evaluate import question_texts, score_details
from trainables.methods import METHODS, STAGE1, apply_stage, check_stage, dir_mb


@dataclass
class Ctx:
    cfg: TrialConfig
    rank: int
    world: int
    device: torch.device
    processor: object
    root: Path
    log: object  # tracking.trial_log.TrialLog on rank 0, else None
    name: str = ""
    image_tokens: int | None = None  # placeholders per image; None = one per vision patch (LLaVA)

    def encode(self, name: str, for_generation: bool = False, limit: int = 0) -> D.Encoded:
        """One split of the trial's dataset, tokenized for this trial's model and method (shared shards)."""
        from trainables import shards

        storage = Path(self.cfg.storage) if self.cfg.storage else None
        data, hit, seconds = shards.encoded(self.root, name, self.processor, self.cfg.max_length, storage,
                                            for_generation, self.image_tokens, limit, self.cfg.image_aspect)
        if data.ids:
            self.say(f"{name}: {len(data.ids)} samples {'from the shard cache' if hit else 'preprocessed'} "
                     f"in {seconds:.1f} s")
        return data

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[{self.name} {self.cfg.method} {self.cfg.model_size}] {msg}", flush=True)


def setup(cfg: TrialConfig, rank: int, world: int, device, log=None, name: str = "trial") -> Ctx:
    import zoo
    from trainables.model import build_processor

    root = Path(cfg.data) if cfg.data else zoo.world_dir()
    processor = build_processor(cfg)
    image_tokens = METHODS[cfg.method].image_tokens
    return Ctx(cfg, rank, world, device, processor, root, log, name,
               image_tokens(processor, cfg) if image_tokens else None)


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


def train(ctx: Ctx, model, groups: list[dict], data: D.Encoded, steps: int, stage: str,
          saver=None, resume: Path | None = None) -> tuple[object, float, float]:
    """Train `steps` DeepSpeed steps on `data`; returns (engine, seconds, last mean loss).

    `saver` (a checkpoint.Saver) checkpoints along the way; with `resume` (a checkpoint
    directory of this trial) the fresh engine is restored from it and training goes on
    after its step, on the batches an uninterrupted run would see there.
    """
    import deepspeed

    from trainables import checkpoint

    cfg = ctx.cfg
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, cfg.warmup_ratio))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                      config=deepspeed_config(cfg, ctx.world), dist_init_required=False)
    engine.train()
    done = checkpoint.Progress()
    if resume is not None:
        done = checkpoint.restore(resume, engine, cfg, ctx.rank, ctx.world)
        ctx.say(f"{stage}: resumed from the checkpoint at step {done.step}/{steps} ({resume.name})")
    pad = ctx.processor.tokenizer.pad_token_id
    dtype = torch.bfloat16 if cfg.use_gpu else torch.float32
    window = max(1, steps // 10)  # steps per progress line, and the losses final_train_loss averages
    losses, t0 = done.losses, time.perf_counter() - done.seconds
    order = D.batches(len(data.ids), cfg.batch_size, ctx.rank, ctx.world, cfg.seed, steps)
    for step, idx in enumerate(itertools.islice(order, done.step, None), start=done.step):
        batch = {k: v.to(ctx.device) for k, v in D.collate(data, idx, pad).items()}
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
        if saver is not None and saver.due(step + 1, steps):
            if ctx.log is not None:
                ctx.log.flush()  # every step up to a checkpoint is in MLflow before a resume can start after it
            size = saver.save(engine, checkpoint.Progress(step + 1, losses[-window:], time.perf_counter() - t0))
            ctx.say(f"{stage}: checkpoint at step {step + 1}/{steps} ({size:.2f} MB per rank)")
    seconds = time.perf_counter() - t0
    tail = losses[-window:]
    return engine, seconds, sum(tail) / len(tail)


def stage1_steps(cfg: TrialConfig) -> int:
    """Single-stage methods (MMA) start from the assembled model: stage 1 with no steps."""
    return cfg.stage1_steps if METHODS[cfg.method].two_stage else 0


def stage1_key(ctx: Ctx) -> str:
    """Stage 1 depends only on these; trials sharing them share its result (DESIGN.md)."""
    import hashlib

    import zoo
    from trainables.model import llm_id, vision_id

    cfg = ctx.cfg
    captions = ctx.root / "captions.json"
    digest = hashlib.sha256(captions.read_bytes()).hexdigest()[:16] if captions.exists() else "none"
    key = dict(llm=llm_id(cfg.model_size), vision=vision_id(cfg), image_size=cfg.image_size,
               steps=stage1_steps(cfg), lr=cfg.stage1_lr, batch=cfg.batch_size, seed=cfg.seed,
               captions=digest, bf16=cfg.use_gpu, zoo=zoo.ZOO_VERSION)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def stage1(ctx: Ctx) -> tuple[Path, dict]:
    """The stage-1 LLaVA checkpoint (projector aligned on captions), computed once per key.

    Rank 0 holds the key's lock while the trial computes it (zoo.cache), so a
    concurrent trial with the same key waits and then reuses it; the checkpoint is
    built in a temporary directory from the start and renamed into place whole.
    """
    from zoo import cache
    from trainables.model import build_llava, gathered_state

    cfg = ctx.cfg
    target = Path(cfg.storage or tempfile.gettempdir()) / "stage1" / stage1_key(ctx)
    waiting = lambda: ctx.say(f"stage 1: another trial is computing {target.name}; waiting to reuse it")  # noqa
    with cache.locked(target, waiting) if ctx.rank == 0 else contextlib.nullcontext():
        flag = [target.exists()]
        if ctx.world > 1:
            dist.broadcast_object_list(flag, src=0)
        if not flag[0]:
            with cache.building(target) if ctx.rank == 0 else contextlib.nullcontext() as tmp:
                steps = stage1_steps(cfg)
                ctx.say(f"stage 1: aligning the projector ({steps} steps), cached as {target.name}")
                model = build_llava(cfg, ctx.processor)
                model, counts = apply_stage(model, STAGE1)
                seconds, loss, state = 0.0, float("nan"), model.state_dict()
                if steps:
                    captions = ctx.encode("captions.json")
                    params = [p for p in model.parameters() if p.requires_grad]
                    engine, seconds, loss = train(ctx, model, [{"params": params, "lr": cfg.stage1_lr}], captions,
                                                  steps, "stage1")
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


def stage2(ctx: Ctx, base: Path, saver=None, resume: Path | None = None):
    """Visual instruction tuning of the stage-1 model with the trial's method (checkpointed by `saver`,
    continued from the checkpoint `resume`: see `train`)."""
    cfg = ctx.cfg
    method = METHODS[cfg.method]
    model = method.load(base, cfg)
    model, counts = apply_stage(model, method.stage2, cfg, method.wrap)
    images, text = ctx.encode("train.json"), ctx.encode("text.json")
    train_data = D.mixed(images, text, cfg.mix_ratio, cfg.seed)
    skipped = images.too_long + text.too_long
    if len(skipped) > 0.01 * max(1, len(images.ids) + len(text.ids)):
        raise ValueError(f"{len(skipped)} samples have no answer tokens within max_length={cfg.max_length}, "
                         f"e.g. {skipped[:3]}")
    ctx.say(f"stage 2: {cfg.method} on {len(train_data.ids)} samples, {sum(counts.values()):,} trainable params")
    engine, seconds, loss = train(ctx, model, param_groups(model, cfg), train_data, cfg.stage2_steps, "stage2",
                                  saver, resume)
    check_stage(engine.module, method.stage2)
    return engine, counts, seconds, loss, len(skipped)


def peak_memory_gb(device) -> tuple[float, str]:
    """Accelerator peak allocation on GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "gpu_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss"


def evaluate(ctx: Ctx, engine) -> dict[str, float]:
    """`score` on the held-out multimodal split (with how many multiple-choice answers named no
    option: `unparsed`) and, where the dataset has one, `text_score` on its language-only split:
    whether tuning kept the LLM's text skill (the paper's data-mixing question)."""
    cfg = ctx.cfg
    result = {}
    for metric, split in (("score", "eval.json"), ("text_score", "text_eval.json")):
        held_out = ctx.encode(split, for_generation=True, limit=cfg.eval_samples)
        if not held_out.ids and metric != "score":
            continue
        found = score_details(engine.module, held_out, ctx.processor.tokenizer, cfg.max_new_tokens, ctx.device,
                              ctx.rank, ctx.world, synced=cfg.zero_stage == 3,
                              questions=question_texts(D.read_records(ctx.root, split)))
        result[metric] = found.score
        if metric == "score":
            result.update(multiple_choice=found.multiple_choice, unparsed=found.unparsed)
    return result


def save_artifact(ctx: Ctx, engine, out: Path) -> float:
    """Write the method's artifact (a collective under ZeRO-3); its size in MB, the same on every rank."""
    METHODS[ctx.cfg.method].save(ctx, engine, out)
    size = [dir_mb(out) if ctx.rank == 0 else 0.0]
    if ctx.world > 1:
        dist.broadcast_object_list(size, src=0)
    return size[0]


def cost(cfg: TrialConfig, seconds: float, world: int) -> dict[str, float]:
    """The paper's convention: device-hours / devices per node, priced per node-hour."""
    hours = seconds * world / 3600 / cfg.devices_per_node
    return {"gpu_hours": hours, "dollars": hours * cfg.price_per_node_hour}


def run(cfg: TrialConfig, rank: int, world: int, device, log=None, name: str = "trial", saver=None,
        resume: Path | None = None) -> dict:
    """The whole trial on one rank; returns the final metrics (identical on every rank).

    `saver` checkpoints stage 2; `resume` is the checkpoint a restarted worker goes on from
    (stage 1 then comes from its cache)."""
    torch.manual_seed(cfg.seed)
    ctx = setup(cfg, rank, world, device, log, name)
    base, s1 = stage1(ctx)
    engine, counts, seconds, loss, skipped = stage2(ctx, base, saver, resume)
    result = evaluate(ctx, engine)
    peak, source = peak_memory_gb(device)
    peak_t = torch.tensor([peak], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
    s1_seconds = s1["seconds"] * s1["world"] / world  # charged to every trial that uses it
    result.update(cost(cfg, s1_seconds + seconds, world))
    result.update({
        "stage1_gpu_hours": cost(cfg, s1_seconds, world)["gpu_hours"],
        "stage2_gpu_hours": cost(cfg, seconds, world)["gpu_hours"],
        "trainable_params": sum(counts.values()),
        "stage1_trainable_params": s1["trainable_params"],
        "peak_mem_gb": float(peak_t.item()),  # what it measures is the tag peak_mem_source
        "samples_per_s": cfg.batch_size * cfg.stage2_steps / seconds,
        "final_train_loss": loss,
    })
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / METHODS[cfg.method].artifact
        result["artifact_mb"] = save_artifact(ctx, engine, artifact)
        ctx.say(f"score {result['score']:.1f}, {result['gpu_hours']:.2e} GPU-hours per node, "
                f"{result['artifact_mb']:.2f} MB saved")
        if log is not None:
            log.artifacts(artifact, artifact.name)
            log.finish(result, tags={"device": device_name(device), "peak_mem_source": source,
                                     "stage1_checkpoint": str(base), "world_size": world})
    return result


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def train_loop(loop_config: dict) -> None:
    """Ray Train entry point (`train_loop_per_worker`)."""
    import ray.train
    import ray.train.torch

    from tracking.trial_log import TrialLog
    from trainables import checkpoint

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(int(loop_config.get("threads", 1)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrialConfig.from_dict(loop_config["trial"])
    # A restarted worker group attaches to the same run again (found by trial id) and goes on logging there.
    log = TrialLog.attach(loop_config["tracking_uri"], loop_config["experiment_id"], loop_config["trial_id"]) \
        if rank == 0 else None
    saver = checkpoint.Saver(cfg.checkpoint_every, cfg, rank, world)
    with checkpoint.no_repeats(Path(loop_config["run_dir"])), checkpoint.latest() as resume:
        result = run(cfg, rank, world, ray.train.torch.get_device(), log, name=loop_config["trial_id"],
                     saver=saver, resume=resume)
    ray.train.report(result)  # the last report, the only one with `score` (and without a checkpoint)
