"""Evaluation as the worker runs it (the eval split's shard, the loader, score_details) on a real zoo LLaVA:
the same answers at any batch size (DESIGN.md, "Evaluation"), options read from the question the shard keeps.

Left padding changes where each prompt sits in its batch; with the attention mask
and position ids following the mask, a prompt's answer must not depend on its neighbours.
"""

import json

import pytest
import torch
from support import collate_for, dataset_of

from trainables.config import TrialConfig
from trainables.data.loader import eval_indices, eval_loader
from trainables.answers import options
from trainables.data.tokens import tokenize
from trainables.evaluate import generate_answers, score_details
from trainables.model import num_image_tokens

CPU = torch.device("cpu")
MC_QUESTION = "What color is the square?\nA. red\nB. blue\nC. green\nD. the dark purple\nAnswer with the option's letter."


@pytest.fixture(scope="module")
def llava(zoo_ready):
    from trainables.model import build_llava, build_processor

    cfg = TrialConfig(model_size="0.3m")
    processor = build_processor(cfg)
    return build_llava(cfg, processor).eval(), processor


def test_answers_do_not_depend_on_batch_size(llava, zoo_ready, tmp_path):
    model, processor = llava
    world_dir, _ = zoo_ready
    # Image questions and language-only ones, so batches mix prompt lengths and padding.
    records = json.loads((world_dir / "eval.json").read_text())[:16]
    records += json.loads((world_dir / "text_eval.json").read_text())[:8]
    data = dataset_of(records, processor, world_dir / "images", tmp_path, for_generation=True)
    assert len(data) == 24 and len({len(data.shard.input_ids(i)) for i in range(24)}) > 1
    collate = collate_for(processor, num_image_tokens(processor), left=True)
    tok, idx = processor.tokenizer, list(range(24))
    answers = {n: generate_answers(model, eval_loader(data, idx, n, collate), tok, 8, CPU) for n in (1, 8, 24)}
    assert answers[1] == answers[8] == answers[24] and sorted(answers[1]) == idx
    assert any(answers[1].values()), "the model should say something for at least one prompt"


def test_options_are_read_from_the_question_the_shard_keeps(llava, zoo_ready, tmp_path):
    model, processor = llava
    world_dir, _ = zoo_ready
    records = json.loads((world_dir / "eval.json").read_text())[:6]
    for n, rec in enumerate(records[:4]):  # four become multiple choice, two stay short-answer
        human, gpt = rec["conversations"]
        human["value"] += "\nA. red\nB. blue\n(C) green\nD: the other one"
        gpt["value"] = "ABCD"[n]
    data = dataset_of(records, processor, world_dir / "images", tmp_path, for_generation=True)
    collate = collate_for(processor, num_image_tokens(processor), left=True)
    found = score_details(model, data, collate, processor.tokenizer, 4, CPU, batch_size=3)
    assert found.questions == 6 and found.multiple_choice == 4 and found.unparsed <= 4
    assert score_details(model, data, collate, processor.tokenizer, 4, CPU, batch_size=1) == found


def test_zero_questions_is_never_a_score(llava, zoo_ready, tmp_path):
    model, processor = llava
    world_dir, _ = zoo_ready
    records = json.loads((world_dir / "eval.json").read_text())[:2]
    data = dataset_of(records, processor, world_dir / "images", tmp_path, for_generation=True)
    data.rows = data.rows[:0]
    collate = collate_for(processor, num_image_tokens(processor), left=True)
    with pytest.raises(ValueError, match="a score over zero questions is not a number"):
        score_details(model, data, collate, processor.tokenizer, 4, CPU)


def test_ranks_share_the_eval_split_and_zero3_ranks_run_as_many_passes():
    assert eval_indices(5, 0, 2, synced=False) == [0, 2, 4] and eval_indices(5, 1, 2, synced=False) == [1, 3]
    assert eval_indices(5, 1, 2, synced=True) == [1, 3, 1], "the short share repeats its first item"


def test_the_question_scored_is_the_last_human_turn():
    """The shard keeps each eval record's last human turn: where a multiple-choice question lists options."""
    from trainables.config import TrialConfig
    from trainables.model import build_processor

    rec = {"id": 7, "conversations": [{"from": "human", "value": "<image>\nfirst"}, {"from": "gpt", "value": "x"},
                                      {"from": "human", "value": MC_QUESTION}, {"from": "gpt", "value": "B"}]}
    t = tokenize(rec, build_processor(TrialConfig(model_size="0.3m")).tokenizer, for_generation=True)
    assert t.question == MC_QUESTION and t.answer == "B"
    assert options(t.question) == {"A": "red", "B": "blue", "C": "green", "D": "the dark purple"}
