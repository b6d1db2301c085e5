"""Tokenization with the chat template (only assistant tokens carry loss, one image token expanded per feature
in the batch), the seeded batch order, and the pad-to-square of non-square images."""

import json

import numpy as np
import pytest
import torch
from support import batch, collate_for, dataset_of

from trainables.config import TrialConfig
from trainables.data.loader import StepBatches, square
from trainables.data.tokens import IGNORE, length_problem, tokenize
from trainables.model import build_processor, num_image_tokens


@pytest.fixture(scope="module")
def processor(zoo_ready):
    return build_processor(TrialConfig(model_size="0.3m"))


def test_only_assistant_turns_carry_loss(processor):
    rec = {"id": "multi", "conversations": [
        {"from": "human", "value": "What number comes after two?"}, {"from": "gpt", "value": "three"},
        {"from": "human", "value": "And before two?"}, {"from": "gpt", "value": "one"}]}
    t = tokenize(rec, processor.tokenizer)
    tok = processor.tokenizer
    assert tok.decode(t.labels[t.labels != IGNORE]) == " three</s> one</s>"
    mask = t.labels != IGNORE  # every labelled token is the input's token there (no shift: the model shifts)
    assert (t.labels[mask] == t.input_ids[mask]).all() and t.image_at == -1
    assert t.question == "And before two?" and t.answer == "one"


def test_an_image_is_one_token_in_the_shard_and_one_per_feature_in_the_batch(processor, zoo_ready, tmp_path):
    world_dir, _ = zoo_ready
    rec = json.loads((world_dir / "train.json").read_text())[0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    t = tokenize(rec, processor.tokenizer)
    assert int((t.input_ids == image_id).sum()) == 1 and t.input_ids[t.image_at] == image_id
    data = dataset_of([rec], processor, world_dir / "images", tmp_path)
    b = batch(data, [0], collate_for(processor, num_image_tokens(processor)))
    assert int((b["input_ids"][0] == image_id).sum()) == num_image_tokens(processor) == 16
    assert b["pixel_values"].shape == (1, 3, 32, 32)
    assert (b["labels"][0][b["input_ids"][0] == image_id] == IGNORE).all()
    assert processor.tokenizer.decode(b["labels"][0][b["labels"][0] != IGNORE]).strip() == \
        rec["conversations"][1]["value"] + "</s>"


def test_generation_prompt_ends_at_assistant(processor, zoo_ready):
    world_dir, _ = zoo_ready
    rec = json.loads((world_dir / "eval.json").read_text())[0]
    t = tokenize(rec, processor.tokenizer, for_generation=True)
    assert processor.tokenizer.decode(t.input_ids[-2:]) == " ASSISTANT:"
    assert t.answer == rec["conversations"][-1]["value"] and (t.labels == IGNORE).all()


@pytest.mark.parametrize("args, problem", [
    ((100, 5, 50, 16, 128, False), None),                      # fits with its 16 image tokens: 115
    ((130, -1, 120, 16, 128, False), None),                    # text only, cut at 128: answers from 120 survive
    ((130, 5, 110, 16, 128, False), None),                     # cut at 128: its answer starts at 125 once expanded
    ((130, 5, 115, 16, 128, False), "none of its answer tokens fits"),   # its answer would start at 130
    ((130, 120, 50, 16, 128, False), "would cut its image"),   # its image tokens would run to 136
    ((120, 5, -1, 16, 128, True), "its prompt is 135 tokens with its image (16 image tokens), over max_length=128"),
    ((2000, 10, 1500, 576, 2048, False), "none of its answer tokens fits"),  # CLIP-L/336: 576 tokens per image
])
def test_length_problem(args, problem):
    found = length_problem(*args)
    assert (found is None) if problem is None else (problem in found), found


def test_batches_are_disjoint_across_ranks_and_a_pure_function_of_the_seed():
    r0 = list(StepBatches(10, 4, 0, 2, seed=1, steps=5))
    r1 = list(StepBatches(10, 4, 1, 2, seed=1, steps=5))
    for a, b in zip(r0, r1):
        assert len(a) == len(b) == 2 and not set(a) & set(b)
    assert list(StepBatches(10, 4, 0, 2, seed=1, steps=5, start=3)) == r0[3:], "a resume sees the same batches"
    assert list(StepBatches(10, 4, 0, 2, seed=2, steps=5)) != r0
    epoch = [i for step in StepBatches(10, 10, 0, 1, seed=1, steps=1) for i in step]
    assert sorted(epoch) == list(range(10)), "an epoch sees every sample once"


def test_pad_to_square_uses_the_mean_colour(processor):
    from PIL import Image

    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    padded = square(wide, processor, "pad")
    mean = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    assert padded.size == (32, 32) and padded.getpixel((0, 0)) == mean and padded.getpixel((16, 16)) == (255, 0, 0)
    assert square(wide, processor, "resize") is wide


def test_a_very_thin_image_is_padded_at_the_towers_resolution(processor):
    from PIL import Image

    thin = Image.new("RGB", (1, 100_000), (0, 0, 255))  # padded at its own size it would be 10^10 pixels
    assert square(thin, processor, "pad").size == (32, 32)


def test_a_worker_reads_the_shard_without_loading_it(processor, zoo_ready, tmp_path):
    """Items come from the memory-mapped file: the Arrow table's buffers are the file's pages, not copies."""
    import pyarrow as pa

    world_dir, _ = zoo_ready
    records = json.loads((world_dir / "train.json").read_text())[:50]
    data = dataset_of(records, processor, world_dir / "images", tmp_path)
    item = data[7]
    assert torch.equal(item["input_ids"], torch.from_numpy(tokenize(records[7], processor.tokenizer)
                                                         .input_ids.astype(np.int64)))
    assert pa.total_allocated_bytes() < 1000, "reading a row allocated Arrow memory: the shard was copied"


LOADER_CHILD = """
import os, sys, time, torch
from trainables.data.loader import train_loader

class Big(torch.utils.data.Dataset):  # 1 MB per item: a full pipe, as real image batches fill it
    def __len__(self): return 64
    def __getitem__(self, i): return torch.full((256 * 1024,), float(i))

def collate(items): return {"x": torch.stack(items)}

it = iter(train_loader(Big(), 4, 0, 1, 0, 16, collate, workers=2))
next(it)
time.sleep(1)  # the loader processes fill the pipe with prefetched batches
print(" ".join(str(c.pid) for c in __import__("psutil").Process().children()), flush=True)
time.sleep(600)
"""


def test_loader_processes_die_with_a_killed_training_process(tmp_path):
    """A training process killed with SIGKILL (Ray kills workers that way) leaves no loader process: an orphan
    would hold the Ray worker's sockets, so Ray would never see the worker die and never restart it."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    child = subprocess.Popen([sys.executable, "-c", LOADER_CHILD], stdout=subprocess.PIPE, text=True)
    pids = []
    try:
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 2, pids
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 3  # torch's own watchdog would look after 5 s, and then hang on exit
        while (alive := [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, "loader processes outlived their training process"
    finally:
        child.kill()
        for p in pids:  # orphans are no longer this process's children
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
