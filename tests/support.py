"""Helpers for tests that build batches the way trials do (trainables.data), from the world or from given records."""

from __future__ import annotations

import itertools
from pathlib import Path

from trainables.data import shards, tokens
from trainables.data.check import Split
from trainables.data.loader import Collate, SplitDataset

_count = itertools.count()


def dataset_of(records: list[dict], processor, images_root: Path, tmp_path: Path, for_generation: bool = False,
               aspect: str = "pad") -> SplitDataset:
    """A SplitDataset over `records` (tokenized and written as a shard, as the study's check does)."""
    target = Path(tmp_path) / f"shard-{next(_count)}"
    target.mkdir(parents=True)
    rows = ((i, str(r["id"]), r.get("image"), tokens.tokenize(r, processor.tokenizer, for_generation))
            for i, r in enumerate(records))
    n = shards.write(target, rows)
    return SplitDataset(Split("test", str(target), str(images_root), n), processor, aspect)


def collate_for(processor, image_tokens: int, max_length: int = 128, left: bool = False) -> Collate:
    tok = processor.tokenizer
    return Collate(tok.pad_token_id, tok.convert_tokens_to_ids("<image>"), image_tokens, max_length, left)


def batch(dataset, rows, collate: Collate) -> dict:
    """The padded batch of `rows` of `dataset`, as the model takes it (without the loader's `index`)."""
    out = collate([dataset[i] for i in rows])
    out.pop("index")
    return out


def first_batch(ctx, n: int = 8, split: str = "train") -> dict:
    """The first `n` samples of a trial's split, batched as its training loop would."""
    return batch(ctx.dataset(split), range(n), ctx.collate())


def assert_world_scores(scores: dict) -> None:
    """A trial's evaluation on the world: `score` and `text_score`, and `score` per question type (the world's
    records name their type), each with its count and interval; the types' counts and hits add up to the score's."""
    import pytest

    from zoo import world

    kinds = world.ANSWER_SPACE  # every type is among the held-out questions
    parts = ("", "_n", "_ci_low", "_ci_high")
    assert set(scores) == {f"score{p}{t}" for p in parts for t in ["", *(f"/{k}" for k in kinds)]} | \
        {f"text_score{p}" for p in parts} | {"multiple_choice", "unparsed"}
    assert sum(scores[f"score_n/{k}"] for k in kinds) == scores["score_n"]
    assert sum(scores[f"score/{k}"] * scores[f"score_n/{k}"] for k in kinds) == \
        pytest.approx(scores["score"] * scores["score_n"])
