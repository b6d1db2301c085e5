"""Preprocessed shards: built once per key, reused by the next trial, identical to encoding in memory."""

import torch

from trainables import data as D
from trainables import shards, worker
from trainables.config import TrialConfig


def same(a: D.Encoded, b: D.Encoded) -> bool:
    return (a.ids == b.ids and a.answers == b.answers and a.image_index == b.image_index
            and a.too_long == b.too_long and all(torch.equal(x, y) for x, y in zip(a.input_ids, b.input_ids))
            and all(torch.equal(x, y) for x, y in zip(a.labels, b.labels))
            and torch.equal(a.pixel_values, b.pixel_values))


def test_second_trial_reuses_the_shard(zoo_ready, tmp_path):
    cfg = TrialConfig(model_size="0.3m", storage=str(tmp_path))
    ctx = worker.setup(cfg, 0, 1, torch.device("cpu"))
    first, hit1, built = shards.encoded(ctx.root, "train.json", ctx.processor, cfg.max_length, tmp_path, limit=300)
    (entry,) = [p for p in (tmp_path / "shards").iterdir() if p.is_dir()]
    stamp = (entry / "samples.arrow").stat().st_mtime_ns
    other = worker.setup(cfg.replace(lr=1e-4, lora_rank=8), 0, 1, torch.device("cpu"))  # another trial
    second, hit2, reused = shards.encoded(other.root, "train.json", other.processor, cfg.max_length, tmp_path,
                                          limit=300)
    assert (hit1, hit2) == (False, True)
    assert (entry / "samples.arrow").stat().st_mtime_ns == stamp, "the second trial rewrote the shard"
    in_memory = D.encode(D.read_records(ctx.root, "train.json")[:300], ctx.processor, ctx.root, cfg.max_length)
    assert same(first, in_memory) and same(second, in_memory)
    assert not list((tmp_path / "shards").glob("*.tmp-*")), "a temporary directory was left behind"


def test_key_follows_what_the_encoding_depends_on(zoo_ready, tmp_path):
    cfg = TrialConfig(model_size="0.3m")
    ctx = worker.setup(cfg, 0, 1, torch.device("cpu"))
    records = D.read_records(ctx.root, "eval.json")[:10]
    k = lambda **kw: shards.key(ctx.root, "eval.json", records, **{  # noqa: E731
        "processor": ctx.processor, "max_length": 128, "for_generation": True, "image_tokens": None, "limit": 10,
        **kw})
    assert k() == k()
    assert len({k(), k(max_length=64), k(for_generation=False), k(image_tokens=5), k(limit=9)}) == 5
    wide = worker.setup(cfg.replace(image_size=48), 0, 1, torch.device("cpu"))
    assert k() != k(processor=wide.processor)
