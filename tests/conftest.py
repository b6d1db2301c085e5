"""Shared fixtures: the real zoo and world (built once, cached like a user's), the world checked and sharded as a
study does, a one-rank process group, a small dataset."""

import os
import socket

import pytest
import torch.distributed as dist


@pytest.fixture(scope="session")
def zoo_ready():
    import zoo

    return zoo.ensure_world(), zoo.ensure_zoo()


@pytest.fixture(scope="session")
def world_data(zoo_ready, tmp_path_factory):
    """The synthetic world checked and sharded by trainables.prepare, as `study.run` does before Ray starts,
    for the tests' trials (the zoo's one tokenizer; up to 48-px towers and MMA): its DataPlan."""
    import zoo
    from trainables.config import TrialConfig
    from trainables.prepare import prepare

    configs = [TrialConfig(image_size=48), TrialConfig(method="mma", neck_every=1)]
    report, plan = prepare(zoo.world_dir(), configs, tmp_path_factory.mktemp("world-storage"), progress=False)
    assert plan is not None, report.first_error_line()
    return plan


@pytest.fixture(scope="session")
def process_group():
    """A real gloo process group of one rank, as Ray Train sets up for a 1-worker trial."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


def llava_record(rid, question="What color is the square?", answer="red", image="r0.png") -> dict:
    """One LLaVA-format record; `image=None` makes it language-only."""
    prompt = f"<image>\n{question}" if image else question
    rec = {"id": rid, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
    return {"id": rid, "image": image, **rec} if image else rec


@pytest.fixture
def dataset_dir(tmp_path):
    """A small valid dataset in the DESIGN.md format, every image a real PNG: train.json (4 image
    records + 1 language-only), eval.json (2), captions.json (2), text.json (2), text_eval.json (1)."""
    import json

    from PIL import Image

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for i, color in enumerate([(220, 40, 40), (40, 80, 220), (40, 170, 60), (230, 210, 40)]):
        Image.new("RGB", (24, 24), color).save(root / "images" / f"r{i}.png")
    files = {
        "train.json": [llava_record(f"t{i}", image=f"r{i}.png") for i in range(4)]
        + [llava_record("t-text", "What number comes after two?", "three", image=None)],
        "eval.json": [llava_record(f"e{i}", image=f"r{i}.png") for i in range(2)],
        "captions.json": [llava_record(f"c{i}", "Describe the image briefly.", "a square.", f"r{i}.png")
                          for i in range(2)],
        "text.json": [llava_record(f"x{i}", "What is the opposite of up?", "down", None) for i in range(2)],
        "text_eval.json": [llava_record("y0", "What is the opposite of left?", "right", None)],
    }
    for name, records in files.items():
        (root / name).write_text(json.dumps(records, indent=1))
    return root
