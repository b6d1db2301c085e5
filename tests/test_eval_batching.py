"""Evaluation on a real (zoo) LLaVA: the same answers at any batch size (DESIGN.md, "Evaluation"),
and options found in the decoded prompt exactly as in the question.

Left padding changes where each prompt sits in its batch; with the attention mask
and position ids following the mask, a prompt's answer must not depend on its neighbours.
"""

import json

import pytest
import torch

from trainables import data as D
from trainables.config import TrialConfig
from trainables.evaluate import (_generation_prompt, _prompt, generate_answers, options, question_texts, score,
                                  score_details)


@pytest.fixture(scope="module")
def llava(zoo_ready):
    from trainables.model import build_llava, build_processor

    cfg = TrialConfig(model_size="0.3m")
    processor = build_processor(cfg)
    return build_llava(cfg, processor).eval(), processor


def test_answers_do_not_depend_on_batch_size(llava, zoo_ready):
    model, processor = llava
    world_dir, _ = zoo_ready
    # Image questions and language-only ones, so batches mix prompt lengths and padding.
    records = json.loads((world_dir / "eval.json").read_text())[:16]
    records += json.loads((world_dir / "text_eval.json").read_text())[:8]
    data = D.encode(records, processor, world_dir, max_length=128, for_generation=True)
    assert len(data.ids) == 24 and len({len(ids) for ids in data.input_ids}) > 1
    idx = list(range(len(data.ids)))
    tok = processor.tokenizer
    torch.manual_seed(0)
    one = generate_answers(model, data, idx, tok, max_new_tokens=8, device=torch.device("cpu"), batch_size=1)
    eight = generate_answers(model, data, idx, tok, max_new_tokens=8, device=torch.device("cpu"), batch_size=8)
    assert one == eight
    assert any(one), "the model should say something for at least one prompt"


def test_options_are_found_in_the_decoded_prompt_as_in_the_question(llava, zoo_ready):
    """`score` (what the worker calls) has no question texts: it finds options in the decoded
    prompt, which must agree with `score_details` given the questions themselves."""
    model, processor = llava
    world_dir, _ = zoo_ready
    records = json.loads((world_dir / "eval.json").read_text())[:6]
    for n, rec in enumerate(records[:4]):  # four become multiple choice, two stay short-answer
        human, gpt = rec["conversations"]
        human["value"] += "\nA. red\nB. blue\n(C) green\nD: the other one"
        gpt["value"] = "ABCD"[n]
    data = D.encode(records, processor, world_dir, max_length=128, for_generation=True)
    cpu = torch.device("cpu")
    given = score_details(model, data, processor.tokenizer, 4, cpu, questions=question_texts(records))
    decoded = score_details(model, data, processor.tokenizer, 4, cpu)
    assert given == decoded and given.questions == 6 and given.multiple_choice == 4
    assert given.unparsed <= 4 and score(model, data, processor.tokenizer, 4, cpu) == given.score
    tail = _generation_prompt(processor.tokenizer)
    assert tail == "ASSISTANT:"
    assert options(_prompt(processor.tokenizer, data.input_ids[0], tail)) == {
        "A": "red", "B": "blue", "C": "green", "D": "the other one"}
