"""Greedy-decoding evaluation: normalized exact match, 0-100, sharded over ranks."""

from __future__ import annotations

import re
import string

import torch
import torch.distributed as dist

from trainables.data import Encoded, collate

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD/VQA-style answer normalization: lower case, no punctuation, articles or extra spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


@torch.no_grad()
def generate_answers(model, data: Encoded, idx: list[int], tokenizer, max_new_tokens: int,
                     device, batch_size: int = 32, synced: bool = False) -> list[str]:
    """Greedy answers for samples `idx` (left-padded batches)."""
    model.eval()
    answers = []
    for start in range(0, len(idx), batch_size):
        batch = collate(data, idx[start:start + batch_size], tokenizer.pad_token_id, left=True)
        batch.pop("labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             synced_gpus=synced)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def score(model, data: Encoded, tokenizer, max_new_tokens: int, device, rank: int = 0, world: int = 1,
          synced: bool = False) -> float:
    """Exact-match accuracy (0-100) over all of `data`, each rank answering a strided shard."""
    idx = list(range(rank, len(data.ids), world))
    if synced:  # ZeRO-3: every rank must run the same number of forward passes
        per_rank = -(-len(data.ids) // world)
        idx += idx[:1] * (per_rank - len(idx))
    preds = generate_answers(model, data, idx, tokenizer, max_new_tokens, device, synced=synced)
    seen, hits = set(), 0
    for i, p in zip(idx, preds):
        if i not in seen:
            seen.add(i)
            hits += exact_match(p, data.answers[i])
    totals = torch.tensor([hits, len(seen)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    return float(100.0 * totals[0] / max(totals[1], 1))
