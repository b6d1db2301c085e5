"""Stage-2 checkpoints: what a restarted worker group needs to go on where its trial stopped.

Every `checkpoint_every` stage-2 steps, and after the last one (so a failure during
evaluation does not redo stage 2), each rank writes its own shard into a temporary
directory and reports it with `ray.train.report(metrics, checkpoint=...)`. Ray Train
copies every rank's files into one directory of the trial's run
(`--storage/train/trial-<id>/checkpoint_<time>/`) and keeps the latest one. When a
worker dies, Ray Train restarts the worker group (`FailureConfig(max_failures=
max_worker_failures)`) and each new worker gets that directory from
`ray.train.get_checkpoint()`: it reuses the cached stage 1, rebuilds the stage-2 model,
restores its rank's shard and continues after the checkpoint's step. (Ray Train
registers a checkpoint once it has every rank's report; one whose worker died before
that is never resumed from, though its directory may stay behind.)

A checkpoint directory holds:
- `trial.json` (rank 0): the step, the world size and the trial config, which a resume must match;
- `rank-<r>.safetensors` + `rank-<r>.json` per rank: its DeepSpeed ZeRO optimizer state, i.e.
  its fp32 partition of the trained weights (the only weights saved: LoRA + projector, MMA
  weights, for `full` the LLM and projector; the frozen base, 4-bit or not, comes back from
  the stage-1 cache), AdamW's moments and step count, and the param groups; the LR
  scheduler's state; the RNG states; DeepSpeed's step counters; and the progress: steps done
  (the data position: `data.batches` is deterministic from the seed, so resuming at step k
  skips k batches), the recent losses the progress line and `final_train_loss` average, and
  the seconds trained so far (the trial's cost; work redone after a failure is not charged).

No pickles: tensors go to safetensors, everything else to JSON, and nothing is ever
`torch.load`ed. The shards are DeepSpeed's own `state_dict()` / `load_state_dict()` per
rank (what `engine.save_checkpoint` writes with pickle), so a resume needs the same world
size and ZeRO stage.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

FORMAT = 1
TRIAL = "trial.json"
STARTED = "started"  # in a trial's run directory once its first attempt began (first_attempt)
LOSS_SCALER = "loss_scaler"  # DeepSpeed's key; an object, not data (see `capture`)
SLICES = "param_slice_mappings"  # DeepSpeed's key: trained weight name -> its place in the flat partition
# Config keys that may differ between the run that saved a checkpoint and the one that resumes it.
MAY_DIFFER = ("checkpoint_every", "max_worker_failures", "loader_workers", "eval_batch_size", "interim_every",
              "interim_samples")


class CheckpointMismatch(ValueError):
    """A checkpoint that is not this trial's (another config or world size); the message names what differs."""


# --- nested state <-> one .safetensors (its tensors) + one .json (everything else) ---
# No library does this without pickle: torch.save and torch.distributed.checkpoint's
# metadata are pickles, and safetensors stores only a flat {name: tensor} dict. JSON has
# no tuples and only string keys, so those are tagged; a tensor is replaced by its name
# in the safetensors file (the path to it in the tree).
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


def save_tree(tree, directory: Path, name: str) -> None:
    """Write `tree` (dicts, lists, tuples of tensors, str, int, float, bool, None) as name.{safetensors,json}."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(x, path: str):
        if isinstance(x, torch.Tensor):
            # A private CPU copy: safetensors refuses tensors that share storage (flat groups and their views).
            tensors[path] = x.detach().to("cpu", copy=True).contiguous()
            return {TENSOR: path}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not {TENSOR, TUPLE, ITEMS} & set(x):
                return {k: encode(v, f"{path}/{k}") for k, v in x.items()}
            if not all(isinstance(k, (str, int)) for k in x):
                raise TypeError(f"{name}{path}: dict keys must be str or int, not {[type(k).__name__ for k in x]}")
            return {ITEMS: [[k, encode(v, f"{path}/{k!r}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {TUPLE: [encode(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [encode(v, f"{path}/{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (str, int, float)):  # bool and IntEnum are ints
            return x
        raise TypeError(f"{name}{path}: a {type(x).__name__} is neither a tensor nor a JSON value")

    structure = encode(tree, "")
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure))


def load_tree(directory: Path, name: str, device: str = "cpu"):
    """The tree `save_tree` wrote (tuples and int keys as they were)."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / f"{name}.safetensors"), device=device)

    def decode(x):
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if TENSOR in x:
            return tensors[x[TENSOR]]
        if TUPLE in x:
            return tuple(decode(v) for v in x[TUPLE])
        if ITEMS in x:
            return {k: decode(v) for k, v in x[ITEMS]}
        return {k: decode(v) for k, v in x.items()}

    return decode(json.loads((directory / f"{name}.json").read_text()))


# --- what one rank saves and restores ---

@dataclass
class Progress:
    """Where stage 2 stands: steps done, the recent losses (the averaging window), seconds trained."""
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def rng_state() -> dict:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _event(engine, which: str) -> None:
    """ZeRO-3's checkpoint prologue / epilogue (re-partition, re-gather persistent params), as
    DeepSpeed's own save_checkpoint and load_checkpoint call them; ZeRO-2 has none."""
    hook = getattr(engine.optimizer, f"checkpoint_event_{which}", None)
    if hook is not None:
        hook()


def capture(engine, progress: Progress) -> dict:
    """This rank's shard as a tree."""
    opt = engine.optimizer
    if opt.dynamic_loss_scale:
        raise NotImplementedError("fp16 dynamic loss scaling is not checkpointed (this project trains fp32 / bf16)")
    _event(engine, "prologue")
    # The loss scaler is an object and, without fp16, a constant 1: the resumed engine's own is the same.
    zero = {k: v for k, v in opt.state_dict().items() if k != LOSS_SCALER}
    if SLICES in zero:  # ZeRO-2 names what its flat partitions hold; a rigid load does not read it
        zero[SLICES] = [{name: {"start": a.start, "numel": a.numel} for name, a in group.items()}
                        for group in zero[SLICES]]
    _event(engine, "epilogue")
    return {
        "progress": asdict(progress),
        "optimizer": zero,
        "scheduler": engine.lr_scheduler.state_dict(),
        "engine": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "micro_steps", "skipped_steps")},
        "rng": rng_state(),
    }


def write(directory: Path, engine, progress: Progress, cfg, rank: int, world: int) -> None:
    """This rank's files of a checkpoint (plus `trial.json` from rank 0) into `directory`."""
    save_tree(capture(engine, progress), directory, f"rank-{rank}")
    if rank == 0:
        meta = {"format": FORMAT, "step": progress.step, "world": world, "config": cfg.to_dict()}
        (directory / TRIAL).write_text(json.dumps(meta, indent=1))


def check(directory: Path, cfg, world: int) -> dict:
    """The checkpoint's `trial.json`, if it belongs to this trial; else CheckpointMismatch naming what differs."""
    meta = json.loads((directory / TRIAL).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointMismatch(f"{directory}: checkpoint format {meta.get('format')}, this code reads {FORMAT}")
    if meta["world"] != world:
        raise CheckpointMismatch(f"{directory}: saved by {meta['world']} workers, resumed by {world} "
                                 "(ZeRO shards do not re-partition)")
    mine = cfg.to_dict()
    differ = sorted(k for k in set(mine) | set(meta["config"])
                    if k not in MAY_DIFFER and meta["config"].get(k) != mine.get(k))
    if differ:
        k = differ[0]
        raise CheckpointMismatch(f"{directory}: saved with {k}={meta['config'].get(k)!r}, this trial has "
                                 f"{k}={mine.get(k)!r}")
    return meta


def restore(directory: Path, engine, cfg, rank: int, world: int) -> Progress:
    """Load this rank's shard into a freshly built engine of the same trial; returns where stage 2 stands."""
    check(directory, cfg, world)
    tree = load_tree(directory, f"rank-{rank}")
    opt = engine.optimizer
    shards = [None] * world  # a rigid ZeRO load reads only its own rank's entry
    shards[rank] = {**tree["optimizer"], LOSS_SCALER: opt.loss_scaler}
    _event(engine, "prologue")
    opt.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)
    if cfg.zero_stage != 3:
        # ZeRO-2 keeps the module's weights apart from its fp32 partitions (ZeRO-3's load copies them itself).
        opt.update_lp_params()
    _event(engine, "epilogue")
    engine.lr_scheduler.load_state_dict(tree["scheduler"])
    for key, value in tree["engine"].items():
        setattr(engine, key, value)
    set_rng_state(tree["rng"])
    return Progress(**tree["progress"])


# --- the Ray Train side ---

def report_to_ray(metrics: dict, directory: Path) -> None:
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


@dataclass
class Saver:
    """Checkpoints every `every` steps and after the last one (all ranks at the same steps, as
    `ray.train.report` requires); `report(metrics, directory)` hands each rank's files over."""
    every: int
    cfg: object
    rank: int
    world: int
    report: Callable[[dict, Path], None] = report_to_ray

    def due(self, done: int, steps: int) -> bool:
        return self.every > 0 and (done % self.every == 0 or done == steps)

    def save(self, engine, progress: Progress, metrics: dict | None = None) -> float:
        """Write and report this rank's shard (with `metrics`, e.g. an interim evaluation's); its size in MB."""
        from trainables.methods import dir_mb

        with tempfile.TemporaryDirectory(prefix="stage2-checkpoint-") as tmp:
            write(Path(tmp), engine, progress, self.cfg, self.rank, self.world)
            size = dir_mb(Path(tmp))
            # driver.tune_report_callback forwards this to Tune only when it carries an interim evaluation.
            self.report({"stage2_step": progress.step, "train_loss": progress.losses[-1], **(metrics or {})},
                        Path(tmp))
        return size


@contextmanager
def latest() -> Iterator[Path | None]:
    """The trial's latest checkpoint directory, if Ray Train has one (a restarted worker group, or a
    re-run trial whose Train run is in storage), else None; valid inside the block."""
    import ray.train

    found = ray.train.get_checkpoint()
    if found is None:
        yield None
        return
    with found.as_directory() as directory:
        yield Path(directory)


# --- errors a retry would repeat ---
# Ray Train V2 retries every worker error, not only dead processes (its DefaultFailurePolicy
# counts any WorkerGroupError against max_failures, and 2.60 has no public hook for another
# policy). Resuming is exact, so an error of the trial itself (a diverging loss, bad data, a
# checkpoint of another trial) would come back after every restart: the attempt that meets
# it records it in the Train run's directory, and a restarted worker raises it again at once
# instead of rebuilding the model to meet it again. Errors that can come from the machine
# are retried: RuntimeError (a collective broken by a dead peer, CUDA), OSError (storage),
# MemoryError.
RETRIED = (RuntimeError, OSError, MemoryError)
# Not errors: a trial the study's scheduler stopped ends its workers this way (trainables.worker.StoppedEarly).
NOT_ERRORS = ("StoppedEarly",)
FAILED = "failed.json"


def first_attempt(run_dir: Path) -> bool:
    """Whether this is the first attempt of the trial whose Ray Train run directory is `run_dir` (rank 0 marks
    it): a worker group Ray Train restarted, or a trial a resumed study runs again, is not."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        (run_dir / STARTED).touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


@contextmanager
def no_repeats(run_dir: Path) -> Iterator[None]:
    """Raise the error an earlier attempt of this trial recorded; record one this attempt meets."""
    seen = run_dir / FAILED
    if seen.is_file():
        before = json.loads(seen.read_text())
        # Same type and first line as the first time (what the study reports); `from None`: it is the root cause.
        raise _rebuilt(before["type"], f"{before['message']}\n(not retried: an earlier attempt of this trial "
                       "failed with it, and a restart from its checkpoint repeats the same steps; its traceback:\n"
                       f"{before['traceback']})") from None
    try:
        yield
    except Exception as error:
        if not isinstance(error, RETRIED) and type(error).__name__ not in NOT_ERRORS:
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = run_dir / f"{FAILED}.{os.getpid()}"  # every rank may meet it: each writes whole, then renames
            kind = f"{type(error).__module__}:{type(error).__qualname__}"
            tmp.write_text(json.dumps({"type": kind, "message": str(error),
                                       "traceback": "".join(traceback.format_exception(error))}))
            os.replace(tmp, seen)
        raise


def _rebuilt(kind: str, message: str) -> Exception:
    """An exception of the recorded type (`module:qualname`), or a RuntimeError naming it."""
    module, _, name = kind.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(message)
    except Exception:  # noqa: BLE001 - a type we cannot rebuild still fails the trial, by name
        pass
    return RuntimeError(f"{name}: {message}")
