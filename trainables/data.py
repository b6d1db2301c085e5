"""LLaVA-format data -> tensors: only assistant tokens carry loss, nothing dropped silently.

A dataset directory (DESIGN.md, "Data") holds train.json, eval.json, captions.json,
text.json (+ text_eval.json) and images/. The synthetic world is written in the
same format, so one loader serves both.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

ROLES = {"human": "user", "gpt": "assistant"}


@dataclass
class Encoded:
    """Tokenized samples of one split; `image_index[i]` points into `pixel_values` or is -1."""
    ids: list[str]
    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    image_index: list[int]
    pixel_values: torch.Tensor | None
    answers: list[str]
    too_long: list[str]


def read_records(root: Path, name: str) -> list[dict]:
    path = Path(root) / name
    if not path.exists():
        return []
    return json.loads(path.read_text())


def messages(conversations: list[dict]) -> list[dict]:
    return [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in conversations]


def square(image: Image.Image, processor, aspect: str) -> Image.Image:
    """LLaVA's image_aspect_ratio: "pad" to a square with the processor's mean colour (so the
    centre crop keeps the whole image), or "resize" (leave it to the processor's resize + crop)."""
    if aspect == "resize" or image.width == image.height:
        return image
    mean = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    side = max(image.size)
    return ImageOps.pad(image, (side, side), color=mean)


def encode(records: list[dict], processor, root: Path, max_length: int, for_generation: bool = False,
           image_tokens: int | None = None, image_aspect: str = "pad") -> Encoded:
    """Tokenize records with the chat template; `for_generation` keeps the prompt only.

    `image_tokens` placeholders stand for each image (default: one per vision patch,
    as LLaVA; MMA's visual neck uses fewer). Labels mark the characters of assistant
    turns, found by rendering each turn's prefix with the same template, and mapped to
    tokens through offsets.
    """
    from trainables.model import num_image_tokens

    tok = processor.tokenizer
    image_token = "<image>"
    expanded = image_token * (image_tokens or num_image_tokens(processor))
    out = Encoded([], [], [], [], None, [], [])
    images = []
    for rec in records:
        msgs = messages(rec["conversations"])
        if for_generation:
            answer = msgs[-1]["content"]
            text = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            spans = []
        else:
            answer = ""
            text = tok.apply_chat_template(msgs, tokenize=False)
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    start = len(tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True))
                    end = len(tok.apply_chat_template(msgs[: i + 1], tokenize=False))
                    spans.append((start, end))
        # Expand <image> into one token per image feature (what LlavaProcessor does), shifting spans.
        if "image" in rec:
            at = text.index(image_token)
            shift = len(expanded) - len(image_token)
            text = text.replace(image_token, expanded, 1)
            spans = [(s + shift if s > at else s, e + shift if e > at else e) for s, e in spans]
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"])
        labels = torch.full_like(ids, -100)
        for j, (s, e) in enumerate(enc["offset_mapping"]):
            if any(a <= s < b for a, b in spans):
                labels[j] = ids[j]
        if len(ids) > max_length:
            if for_generation or "image" in rec:
                out.too_long.append(rec["id"])
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        if not for_generation and not (labels != -100).any():
            out.too_long.append(rec["id"])
            continue
        out.ids.append(rec["id"])
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.answers.append(answer)
        if "image" in rec:
            out.image_index.append(len(images))
            image = Image.open(Path(root) / "images" / rec["image"]).convert("RGB")
            images.append(square(image, processor, image_aspect))
        else:
            out.image_index.append(-1)
    if images:
        out.pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return out


def collate(data: Encoded, idx: list[int], pad_id: int, left: bool = False) -> dict:
    """Pad a batch (right for training, left for generation) and stack its images."""
    width = max(len(data.input_ids[i]) for i in idx)
    input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(data.input_ids[i])
        cols = slice(width - n, width) if left else slice(0, n)
        input_ids[row, cols] = data.input_ids[i]
        labels[row, cols] = data.labels[i]
        mask[row, cols] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    with_image = [data.image_index[i] for i in idx if data.image_index[i] >= 0]
    if with_image:
        batch["pixel_values"] = data.pixel_values[with_image]
    return batch


def concat(a: Encoded, b: Encoded) -> Encoded:
    offset = 0 if a.pixel_values is None else len(a.pixel_values)
    pix = [p for p in (a.pixel_values, b.pixel_values) if p is not None]
    return Encoded(a.ids + b.ids, a.input_ids + b.input_ids, a.labels + b.labels,
                   a.image_index + [i + offset if i >= 0 else -1 for i in b.image_index],
                   torch.cat(pix) if pix else None, a.answers + b.answers, a.too_long + b.too_long)


def batches(n: int, batch_size: int, rank: int, world: int, seed: int, steps: int):
    """`steps` batches of indices for this rank: reshuffled every epoch, disjoint across ranks."""
    rng = random.Random(seed)
    order: list[int] = []
    per_rank = batch_size // world
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        step, order = order[:batch_size], order[batch_size:]
        yield step[rank * per_rank:(rank + 1) * per_rank]


def mixed(images: Encoded, text: Encoded, mix_ratio: float, seed: int) -> Encoded:
    """Stage-2 data with a fraction `mix_ratio` of language-only samples (the paper's data mixing)."""
    if mix_ratio <= 0 or not text.ids:
        return images
    n_text = min(len(text.ids), round(len(images.ids) * mix_ratio / (1 - mix_ratio)))
    keep = sorted(random.Random(seed).sample(range(len(text.ids)), n_text))
    sub = Encoded([text.ids[i] for i in keep], [text.input_ids[i] for i in keep], [text.labels[i] for i in keep],
                  [-1] * n_text, None, [text.answers[i] for i in keep], [])
    return concat(images, sub)
