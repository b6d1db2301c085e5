"""Tokenization with the chat template: only assistant tokens carry loss; image tokens expanded."""

import json

import pytest

from trainables import data as D
from trainables.config import TrialConfig
from trainables.model import build_processor, num_image_tokens


@pytest.fixture(scope="module")
def processor(zoo_ready):
    return build_processor(TrialConfig(model_size="0.3m"))


def test_only_assistant_turns_carry_loss(processor, zoo_ready, tmp_path):
    world_dir, _ = zoo_ready
    rec = {"id": "multi", "conversations": [
        {"from": "human", "value": "What number comes after two?"}, {"from": "gpt", "value": "three"},
        {"from": "human", "value": "And before two?"}, {"from": "gpt", "value": "one"}]}
    enc = D.encode([rec], processor, world_dir, max_length=128)
    tok = processor.tokenizer
    labelled = enc.labels[0][enc.labels[0] != -100]
    assert tok.decode(labelled) == " three</s> one</s>"
    # every labelled token is the same token as the input (no shift, the model shifts)
    mask = enc.labels[0] != -100
    assert (enc.labels[0][mask] == enc.input_ids[0][mask]).all()


def test_image_record_expands_image_tokens(processor, zoo_ready):
    world_dir, _ = zoo_ready
    rec = json.loads((world_dir / "train.json").read_text())[0]
    enc = D.encode([rec], processor, world_dir, max_length=128)
    image_id = tok_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((enc.input_ids[0] == image_id).sum()) == num_image_tokens(processor) == 16
    assert enc.pixel_values.shape == (1, 3, 32, 32) and tok_id == image_id
    assert processor.tokenizer.decode(enc.labels[0][enc.labels[0] != -100]).strip() == \
        rec["conversations"][1]["value"] + "</s>"


def test_generation_prompt_ends_at_assistant(processor, zoo_ready):
    world_dir, _ = zoo_ready
    rec = json.loads((world_dir / "eval.json").read_text())[0]
    enc = D.encode([rec], processor, world_dir, max_length=128, for_generation=True)
    assert processor.tokenizer.decode(enc.input_ids[0][-2:]) == " ASSISTANT:"
    assert enc.answers == [rec["conversations"][-1]["value"]]


def test_batches_are_disjoint_across_ranks():
    r0 = list(D.batches(10, 4, 0, 2, seed=1, steps=5))
    r1 = list(D.batches(10, 4, 1, 2, seed=1, steps=5))
    for a, b in zip(r0, r1):
        assert len(a) == len(b) == 2 and not set(a) & set(b)


def test_pad_to_square_uses_the_mean_colour(zoo_ready):
    from PIL import Image

    from trainables.config import TrialConfig
    from trainables.data import square
    from trainables.model import build_processor

    processor = build_processor(TrialConfig(model_size="0.3m"))
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    padded = square(wide, processor, "pad")
    mean = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    assert padded.size == (40, 40) and padded.getpixel((0, 0)) == mean and padded.getpixel((20, 20)) == (255, 0, 0)
    assert square(wide, processor, "resize") is wide
