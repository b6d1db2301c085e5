"""The zoo: every part loads with stock `from_pretrained`; building is deterministic and reloads identically."""

import random

import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

import zoo
from zoo import models


def test_zoo_parts_load_with_from_pretrained(zoo_ready):
    tok = AutoTokenizer.from_pretrained(zoo.tokenizer_path())
    assert "<image>" in tok.get_vocab() and tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "USER: hi ASSISTANT:"
    sizes = {}
    for size in zoo.LLM_SIZES:
        model = LlamaForCausalLM.from_pretrained(zoo.llm_path(size))
        sizes[size] = sum(p.numel() for p in model.parameters())
    assert max(sizes.values()) / min(sizes.values()) >= 8, sizes  # the model-size axis spans ~10x
    assert sorted(sizes.values()) == list(sizes.values())
    for image_size in zoo.IMAGE_SIZES:
        tower = CLIPVisionModel.from_pretrained(zoo.vision_path(image_size))
        assert tower.config.image_size == image_size
        assert AutoImageProcessor.from_pretrained(zoo.vision_path(image_size)).crop_size["height"] == image_size


def test_pretrained_llm_speaks_the_world(zoo_ready):
    """Briefly pretrained means: far lower loss on fresh world text than the same model at init."""
    tok = AutoTokenizer.from_pretrained(zoo.tokenizer_path())
    texts = [tok.apply_chat_template(c, tokenize=False) for c in models._corpus(random.Random(123), 32)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    trained = LlamaForCausalLM.from_pretrained(zoo.llm_path("1m"))
    fresh = LlamaForCausalLM(trained.config)
    with torch.no_grad():
        assert trained(**enc, labels=labels).loss < 0.3 * fresh(**enc, labels=labels).loss


def test_build_is_deterministic_and_reloads_identically(tmp_path):
    convs = models._corpus(random.Random(0), 200)
    texts = [models._render(c) for c in convs]
    tok_a, tok_b = models.build_tokenizer(texts), models.build_tokenizer(texts)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    a = models.pretrain_llm("0.3m", tok_a, convs, steps=3, seed=5)
    b = models.pretrain_llm("0.3m", tok_b, convs, steps=3, seed=5)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    a.save_pretrained(tmp_path / "llm")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "llm")
    ids = torch.tensor([tok_a("USER: What number comes after two?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, back(ids).logits)
    v1 = models.pretrain_vision(32, tok_a, steps=2, seed=5)
    v2 = models.pretrain_vision(32, tok_a, steps=2, seed=5)
    v1.save_pretrained(tmp_path / "clip")
    v3 = CLIPVisionModel.from_pretrained(tmp_path / "clip")
    for (name, p), q, r in zip(v1.state_dict().items(), v2.state_dict().values(), v3.state_dict().values()):
        assert torch.equal(p, q) and torch.equal(p, r), name


def test_every_llm_size_is_pretrained_to_a_similar_loss(zoo_ready):
    """The model-size axis compares LLMs pretrained alike (zoo.models.LLM_STEPS: the same steps on the same text):
    on 256 held-out world conversations their losses lie within 7% of each other (zoo v2: 0.413, 0.435 and 0.432 for
    0.3m, 1m and 3.6m), and each is far below a fresh model's, so no size starts visual tuning half-pretrained."""
    tok = AutoTokenizer.from_pretrained(zoo.tokenizer_path())
    texts = [tok.apply_chat_template(c, tokenize=False) for c in models._corpus(random.Random(123), 256)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    losses = {}
    with torch.no_grad():
        for size in zoo.LLM_SIZES:
            model = LlamaForCausalLM.from_pretrained(zoo.llm_path(size))
            losses[size] = model(**enc, labels=labels).loss.item()
            assert losses[size] < 0.3 * LlamaForCausalLM(model.config)(**enc, labels=labels).loss.item()
    assert max(losses.values()) / min(losses.values()) < 1.07, losses
    assert len(set(models.LLM_STEPS.values())) == 1, models.LLM_STEPS


def test_a_tower_that_never_leaves_a_guess_s_loss_is_refused(monkeypatch):
    """A contrastive tower whose loss stays at ln(batch) learned nothing (zoo v1's 32-px tower did, silently): the
    build raises instead of saving it. Here the learning rate is 0, so the loss cannot move."""
    import pytest
    from transformers import AutoTokenizer as Tok

    monkeypatch.setattr(models, "VISION_LR", 0.0)
    tok = Tok.from_pretrained(zoo.tokenizer_path())
    with pytest.raises(RuntimeError, match=r"clip-32: the contrastive loss stayed at 4\.\d\d, a guess's ln\(64\)"):
        models.pretrain_vision(32, tok, steps=100)
