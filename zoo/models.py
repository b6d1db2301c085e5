"""The laptop model zoo: tiny pretrained models the project builds and caches itself.

    python -m zoo                  # build (once) and print where the zoo and the world live

No hub is reachable here or on many clusters' compute nodes, so the default study
stands on models we make: a byte-level BPE tokenizer (trained with `tokenizers`)
with a Vicuna-style chat template and an `<image>` token; Llama-architecture LLMs
at three sizes spanning ~10x in parameters, each briefly pretrained on the world's
text; a CLIP vision tower contrastively pretrained (with a small CLIP text tower
that is then dropped) at two input resolutions, the paper's 224-vs-336 axis in
miniature. Everything is saved with `save_pretrained` and loaded back with
`from_pretrained`, the same path that loads `lmsys/vicuna-7b-v1.5` and
`openai/clip-vit-large-patch14-336` on a cluster.

The cache lives in `$MMSCALE_CACHE` (default `~/.cache/mmscale`), is built once
under a file lock and moved into place atomically, and is a pure function of the
seed and ZOO_VERSION.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

from zoo import cache, world

ZOO_VERSION = 2  # 2: every LLM size pretrained for 400 steps (v1: fewer for larger), towers at lr 5e-4 for 600
SEED = 0
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Llama shapes for the model-size axis (names are rounded parameter counts, like
# the paper's 7B / 13B / 33B). Every size is pretrained for the same steps on the same
# text and ends at a similar loss (direction 1 of docs/REPORT.md, a larger LLM scores higher,
# should not hinge on which size was cut short). Zoo v1 gave the larger sizes fewer steps
# (0.3m 400, 1m 300, 3.6m 250) to save build time. Mean loss over the last 25 steps
# (zoo.models.pretrain_llm, 1 thread): 0.3m 0.407 at 400 steps; 1m 0.428 at 300, 0.411 at 400;
# 3.6m 0.425 at 250, 0.416 at 400. On 256 held-out world conversations, zoo v2: 0.413, 0.435,
# 0.432 (tests/test_zoo.py). The captions describe random scenes, so every size is near the
# text's own entropy, and more steps do not make a larger LLM's loss lower than a smaller one's.
LLM_SIZES = {
    "0.3m": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "1m": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384),
    "3.6m": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=768),
}
LLM_STEPS = {"0.3m": 400, "1m": 400, "3.6m": 400}
# Vision tower resolutions (the miniature of CLIP-L/14 at 224 and 336): same
# patch size, so the higher resolution yields more image tokens.
IMAGE_SIZES = (32, 48)
PATCH_SIZE = 8
VISION = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
# Contrastive pretraining of the towers. Zoo v1 trained them at lr 2e-3 for 300 steps, and its
# 32-px tower never left the loss of a guess, ln(64) = 4.16 for a batch of 64 (it stayed a random
# ViT; the LLM still read the image from its random patch features). At lr 5e-4 for 600 steps both
# towers leave that plateau within ~150 steps at every seed, thread count and shape size tried
# (3 seeds; 1 and 2 threads; shapes of 8-13, 11-17 and 18-26 px) and end near 1.4 (32 px) and 1.3
# (48 px). `pretrain_vision` refuses a tower that never left the plateau.
VISION_STEPS = 600
VISION_LR = 5e-4


def zoo_dir() -> Path:
    return cache.cache_dir() / f"zoo-v{ZOO_VERSION}-seed{SEED}"


def world_dir() -> Path:
    return cache.cache_dir() / f"world-v{ZOO_VERSION}.{world.FORMAT}-seed{SEED}"


def llm_path(size: str) -> Path:
    return zoo_dir() / f"llm-{size}"


def vision_path(image_size: int) -> Path:
    return zoo_dir() / f"clip-{image_size}"


def tokenizer_path() -> Path:
    return zoo_dir() / "tokenizer"


def _corpus(rng: random.Random, n: int) -> list[list[dict]]:
    """Chat-formatted pretraining text: grounded scene questions, captions, language-only facts."""
    convs = []
    for i in range(n):
        r = i % 4
        if r < 2:
            q, a = world.grounded_text(rng)
        elif r == 2:
            scene = world.sample_scene(rng)
            q, a = "Describe the scene briefly.", world.caption(scene)
        else:
            q, a = world.text_instruction(rng)
        convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return convs


CHAT_TEMPLATE_PROBE = "USER: <image>\nDescribe the image briefly. ASSISTANT: ok</s>"


def _render(conv: list[dict]) -> str:
    """A conversation as the chat template writes it (before a tokenizer exists)."""
    from jinja2 import Template

    return Template(CHAT_TEMPLATE).render(messages=conv, add_generation_prompt=False)


def build_tokenizer(texts: list[str]):
    """Byte-level BPE trained on the world's text, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": IMAGE_TOKEN})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _batches(items: list, batch_size: int, steps: int, rng: random.Random):
    for _ in range(steps):
        yield rng.sample(items, batch_size)


def pretrain_llm(size: str, tokenizer, convs: list, steps: int, seed: int = SEED, bar=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=False, **LLM_SIZES[size])
    model = LlamaForCausalLM(cfg)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    for batch in _batches(texts, 32, steps, rng):
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(part=f"llm-{size}", loss=f"{loss.item():.3f}")
    model.eval()
    return model


def image_processor(image_size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size})


def pretrain_vision(image_size: int, tokenizer, steps: int, seed: int = SEED, bar=None):
    """Contrastive CLIP pretraining on (image, caption) pairs; returns the vision tower."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    torch.manual_seed(seed)
    rng = random.Random(seed + image_size)
    scenes = [world.sample_scene(rng) for _ in range(2048)]
    proc = image_processor(image_size)
    pixels = proc(images=[world.render(s, rng) for s in scenes], return_tensors="pt")["pixel_values"]
    captions = [world.caption(s) + tokenizer.eos_token for s in scenes]
    text_cfg = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256, max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision_cfg = dict(image_size=image_size, patch_size=PATCH_SIZE, **VISION)
    clip = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=64))
    opt = torch.optim.AdamW(clip.parameters(), lr=VISION_LR, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=VISION_LR, total_steps=steps, pct_start=0.1)
    clip.train()
    batch, losses = 64, []
    for idx in _batches(list(range(len(scenes))), batch, steps, rng):
        enc = tokenizer([captions[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        out = clip(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels[idx],
                   return_loss=True)
        out.loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        losses.append(out.loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(part=f"clip-{image_size}", loss=f"{out.loss.item():.3f}")
    final = sum(losses[-25:]) / len(losses[-25:])
    if steps >= 100 and final > 0.9 * math.log(batch):
        raise RuntimeError(f"clip-{image_size}: the contrastive loss stayed at {final:.2f}, a guess's "
                           f"ln({batch}) = {math.log(batch):.2f}: the tower learned nothing (see VISION_LR)")
    tower = CLIPVisionModel(clip.config.vision_config)
    tower.load_state_dict(clip.vision_model.state_dict())
    return tower.eval()


def build(out: Path, seed: int = SEED) -> None:
    """Build the whole zoo into `out` (a fresh directory)."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    convs = _corpus(rng, 6000)
    total = sum(LLM_STEPS.values()) + VISION_STEPS * len(IMAGE_SIZES)
    with tqdm(total=total, desc="building model zoo (once)", unit="step", file=sys.stderr) as bar:
        tokenizer = build_tokenizer([CHAT_TEMPLATE_PROBE] + [_render(c) for c in convs])
        tokenizer.save_pretrained(out / "tokenizer")
        for size in LLM_SIZES:
            model = pretrain_llm(size, tokenizer, convs, LLM_STEPS[size], seed, bar)
            model.save_pretrained(out / f"llm-{size}")
            tokenizer.save_pretrained(out / f"llm-{size}")
        for image_size in IMAGE_SIZES:
            tower = pretrain_vision(image_size, tokenizer, VISION_STEPS, seed, bar)
            tower.save_pretrained(out / f"clip-{image_size}")
            image_processor(image_size).save_pretrained(out / f"clip-{image_size}")


def ensure_zoo() -> Path:
    return cache.ensure(zoo_dir(), build)


def ensure_world() -> Path:
    return cache.ensure(world_dir(), lambda d: world.write(d, seed=SEED))


