"""Batches for a worker: torch's DataLoader over memory-mapped shards, images decoded lazily by loader processes.

    dataset = SplitDataset(split, processor, image_aspect)      # one split of a trial (trainables.data.check.Split)
    loader = train_loader(dataset, cfg, rank, world, steps, start_step, image_tokens, pad_id, image_id)

As LLaVA's own LazySupervisedDataset does, an item is read when it is asked for: its
tokens from the shard (a memory-mapped Arrow file), its image decoded from its file by
`images.load` (the very function the dataset check ran), squared and preprocessed by the
tower's image processor, in `loader_workers` DataLoader processes beside the training
process. A worker's memory holds a few batches, whatever the number of records.

Batch order is a pure function of the seed (`StepBatches`): step k's global batch is
positions k*B .. (k+1)*B of an endless sequence of seeded permutations, and each rank
takes its slice, so ranks read disjoint shares, and a restarted worker that resumes at
step k gets exactly the batches an uninterrupted run would have seen there.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys

import numpy as np
import torch
from PIL import ImageOps

from trainables.data import images
from trainables.data.shards import Shard
from trainables.data.tokens import IGNORE


def pad_colour(processor) -> tuple[int, int, int]:
    """The processor's mean colour in 0..255: LLaVA pads non-square images with it; transparency is
    composited onto it too, so what is not image is the tower's 'nothing'."""
    return tuple(round(255 * m) for m in processor.image_processor.image_mean)


def square(image, processor, aspect: str):
    """LLaVA's image_aspect_ratio: "pad" to a square with the processor's mean colour (so the centre
    crop keeps the whole image), or "resize" (leave it to the processor's resize + crop).

    Padded at the tower's resolution, not the image's: the processor resizes to it anyway, and a
    1 x 60,000,000 image (within the pixel budget) padded at its own size would be 3.6e15 pixels."""
    if aspect == "resize" or image.width == image.height:
        return image
    crop = processor.image_processor.crop_size
    return ImageOps.pad(image, (crop["width"], crop["height"]), color=pad_colour(processor))


class SplitDataset(torch.utils.data.Dataset):
    """The rows of one split a trial uses (a shard minus its dropped rows), one item per row:
    {"input_ids", "labels" (int64 tensors, one image token), "pixel_values" ([3, H, W] or absent)}."""

    def __init__(self, split, processor, image_aspect: str = "pad", max_pixels: int | None = images.MAX_PIXELS):
        self.split, self.shard = split, Shard(split.shard)
        self.image_processor, self.aspect, self.max_pixels = processor.image_processor, image_aspect, max_pixels
        self.background = pad_colour(processor)
        self._processor = processor
        self.rows = np.setdiff1d(np.arange(split.rows, dtype=np.int64), np.asarray(split.dropped, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> int:
        return int(self.rows[i])

    def pixels(self, name: str) -> torch.Tensor:
        image = images.load(images.resolve(self.split.images, name), self.background, self.max_pixels)
        image = square(image, self._processor, self.aspect)
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, i: int) -> dict:
        r = self.row(i)
        item = {"input_ids": torch.from_numpy(self.shard.input_ids(r).astype(np.int64)),
                "labels": torch.from_numpy(self.shard.labels(r).astype(np.int64)), "index": i}
        name = self.shard.image(r)
        if name is not None:
            item["pixel_values"] = self.pixels(name)
        return item


class Collate:
    """Items -> a padded batch: each image token expanded into `image_tokens` (labels IGNORE), cut at
    `max_length` (the check made sure no cut reaches an image or every answer token), padded right for
    training or left for generation, images stacked in the order their tokens appear."""

    def __init__(self, pad_id: int, image_id: int, image_tokens: int, max_length: int, left: bool = False):
        self.pad_id, self.image_id, self.image_tokens = pad_id, image_id, image_tokens
        self.max_length, self.left = max_length, left

    def expand(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        at = (ids == self.image_id).nonzero()
        if len(at):
            k = int(at[0])
            ids = torch.cat([ids[:k], ids.new_full((self.image_tokens,), self.image_id), ids[k + 1:]])
            labels = torch.cat([labels[:k], labels.new_full((self.image_tokens,), IGNORE), labels[k + 1:]])
        return ids[:self.max_length], labels[:self.max_length]

    def __call__(self, items: list[dict]) -> dict:
        rows = [self.expand(it["input_ids"], it["labels"]) for it in items]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            cols = slice(width - len(ids), width) if self.left else slice(0, len(ids))
            input_ids[r, cols], labels[r, cols], mask[r, cols] = ids, lab, 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                 "index": torch.tensor([it["index"] for it in items])}
        pixels = [it["pixel_values"] for it in items if "pixel_values" in it]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch


class StepBatches(torch.utils.data.Sampler):
    """Steps `start` .. `steps`-1 of a seeded endless shuffle of `n` items: for each, this rank's
    `batch_size // world` indices (global batch k = positions k*B .. (k+1)*B, rank r its r-th slice)."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, steps: int, start: int = 0):
        if n < 1:
            raise ValueError("no samples to draw batches from")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.steps, self.start = seed, steps, start
        self._epoch, self._perm = -1, None

    def _position(self, p: int) -> int:
        epoch, at = divmod(p, self.n)
        if epoch != self._epoch:  # one permutation in memory at a time: O(n) int64, not O(steps)
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[at])

    def __iter__(self):
        per_rank = self.batch_size // self.world
        for step in range(self.start, self.steps):
            first = step * self.batch_size + self.rank * per_rank
            yield [self._position(p) for p in range(first, first + per_rank)]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


class _AsNumpy:
    """A loader process's collate that hands batches over as numpy arrays, turned back into tensors by
    `_Tensors` in the training process. Pickled by value, a batch of small arrays crosses the process
    boundary faster than torch's default (a shared-memory segment and a file descriptor per tensor):
    1.5 against 3.9 ms per batch of 32 on the world (bench.data_scale), on a ~150 ms step."""

    def __init__(self, collate: Collate):
        self.collate = collate

    def __call__(self, items: list[dict]) -> dict:
        return {k: v.numpy() for k, v in self.collate(items).items()}


class _Tensors:
    """Iterate a DataLoader whose batches are numpy arrays (see `_AsNumpy`) as batches of tensors."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            yield {k: torch.from_numpy(v) for k, v in batch.items()}

    def __len__(self) -> int:
        return len(self.loader)


class _DieWithParent:
    """A loader process's `worker_init_fn`: on Linux the kernel kills it (SIGKILL) when the thread that
    forked it ends, so a training process that dies (SIGKILL, OOM) takes its loader processes with it.

    Without this, a forked loader process outlives its killed parent: torch's watchdog ends its loop, but
    its exit then waits forever on a queue feeder writing to a pipe that nobody reads, and, forked from a
    Ray worker, it holds that worker's Ray sockets open, so Ray never learns the worker died and Ray
    Train never restarts the trial's worker group (the trial hangs). Written by hand: neither torch nor
    Ray sets a parent-death signal on DataLoader processes. Elsewhere (macOS) nothing is set."""

    def __init__(self):
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        if not sys.platform.startswith("linux"):
            return
        PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.parent:  # the parent died before the signal was set
            os._exit(0)


def _loader(dataset, batch_sampler, collate: Collate, workers: int):
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=_AsNumpy(collate) if workers else collate,
        num_workers=workers,
        prefetch_factor=2 if workers else None, persistent_workers=False,
        # Its own generator: an iterator otherwise draws its workers' base seed from the global RNG, so a
        # loader made after a resume would shift every later dropout mask (stage 2 must resume exactly).
        generator=torch.Generator().manual_seed(0),
        # fork: workers start in milliseconds and share the parent's pages (the shard's mapping, the model's
        # code); loader processes never touch torch.distributed or DeepSpeed, which fork would not carry.
        multiprocessing_context="fork" if workers else None,
        worker_init_fn=_DieWithParent() if workers else None)
    return _Tensors(loader) if workers else loader


def train_loader(dataset, batch_size: int, rank: int, world: int, seed: int, steps: int, collate: Collate,
                 workers: int = 0, start: int = 0):
    """This rank's batches of steps `start`.. `steps`-1 (resume at `start`: the same batches as before)."""
    return _loader(dataset, StepBatches(len(dataset), batch_size, rank, world, seed, steps, start), collate, workers)


def eval_indices(n: int, rank: int, world: int, synced: bool) -> list[int]:
    """This rank's strided share of `n` items; under ZeRO-3 (`synced`) every rank runs as many forward
    passes as the busiest, so short shares repeat their first item (scored once)."""
    idx = list(range(rank, n, world))
    if synced and idx:
        idx += idx[:1] * (math.ceil(n / world) - len(idx))
    return idx


def eval_loader(dataset, indices: list[int], batch_size: int, collate: Collate, workers: int = 0):
    """Left-padded prompts of `indices`, `batch_size` at a time, in order."""
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return _loader(dataset, batches, collate, workers)
