"""Preprocessed shards: built once per key by the study's check, reused by the next study, read lazily by trials."""

import json

import numpy as np

import zoo
from trainables.config import TrialConfig
from trainables.data import shards
from trainables.data.tokens import tokenize
from trainables.model import build_processor
from trainables.prepare import prepare


def test_a_second_study_reuses_the_shards(zoo_ready, tmp_path):
    configs = [TrialConfig(model_size="0.3m")]
    report, first = prepare(zoo.world_dir(), configs, tmp_path, progress=False)
    train = first.split(next(iter(first.splits)), "train")
    stamp = (tmp_path / "shards").stat().st_mtime_ns, (tmp_path / "shards" / train.shard.split("/")[-1] /
                                                       shards.FILE).stat().st_mtime_ns
    report, second = prepare(zoo.world_dir(), configs, tmp_path, progress=False)
    assert second == first
    assert (tmp_path / "shards" / train.shard.split("/")[-1] / shards.FILE).stat().st_mtime_ns == stamp[1]
    assert not list((tmp_path / "shards").glob("*.tmp-*")), "a temporary directory was left behind"

    # the shard holds what tokenizing the records in memory gives, in record order
    records = json.loads((zoo.world_dir() / "train.json").read_text())
    shard, tok = shards.Shard(train.shard), build_processor(configs[0]).tokenizer
    for i in (0, 1, 2345, len(records) - 1):
        t = tokenize(records[i], tok)
        assert np.array_equal(shard.input_ids(i), t.input_ids) and np.array_equal(shard.labels(i), t.labels)
        assert shard.image(i) == records[i]["image"] and shard.record_id(i) == records[i]["id"]


def test_key_follows_what_the_encoding_depends_on(zoo_ready):
    k = lambda **kw: shards.key({"data": "d", "rows": "r", "tokenizer": "t", "generation": False, **kw})  # noqa
    assert k() == k()
    assert len({k(), k(data="e"), k(rows="s"), k(tokenizer="u"), k(generation=True)}) == 5
    small, wide = build_processor(TrialConfig(model_size="0.3m")), build_processor(TrialConfig(image_size=48))
    assert shards.tokenizer_key(small.tokenizer) == shards.tokenizer_key(wide.tokenizer), \
        "the tower does not change the text: one shard serves both resolutions"
    other = build_processor(TrialConfig(model_size="0.3m")).tokenizer
    other.chat_template = "{{ messages[0]['content'] }}"
    assert shards.tokenizer_key(other) != shards.tokenizer_key(small.tokenizer)
