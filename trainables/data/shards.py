"""Preprocessed splits: tokenized records in one memory-mapped Arrow file per (split, tokenizer), shared by trials.

    write(target, rows)      # rows: (record index, record id, image name or None, Tokens), in index order
    shard = Shard(target)    # memory-mapped: nothing is read until a row is asked for
    shard.input_ids(i), shard.labels(i), shard.image(i), shard.answer(i), shard.question(i)

A shard holds text only: token ids with one `<image>` token per image, labels, the image's
file name (decoded lazily by the loader, never stored), the reference answer and the
question. Built by the study before Ray starts (trainables.data.check), under the cache
discipline of zoo.cache (one builder per key, built in a temporary sibling, renamed whole),
in record batches, so neither building nor reading holds a split in memory: a worker maps
the file and touches the pages of the rows it reads (its rank's share), whatever the
number of records. Arrow IPC, not pickle: nothing read back runs code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT = 4  # bump when the layout below changes (4: the question's category)
FILE, META = "samples.arrow", "meta.json"
BATCH = 4096  # rows per Arrow record batch


def key(parts: dict) -> str:
    """A shard's name from everything its content depends on (data digest, tokenizer, template, ...)."""
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tokenizer_key(tokenizer) -> str:
    """What a tokenization depends on: the vocabulary (added tokens included) and the chat template."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256((vocab + "\0" + str(tokenizer.chat_template)).encode()).hexdigest()[:24]


def _schema():
    import pyarrow as pa

    return pa.schema([("index", pa.int64()), ("id", pa.string()), ("image", pa.string()),
                      ("input_ids", pa.large_list(pa.int32())), ("labels", pa.large_list(pa.int32())),
                      ("image_at", pa.int32()), ("first_label", pa.int32()), ("answer", pa.string()),
                      ("question", pa.string()), ("category", pa.string())])


def write(target: Path, rows) -> int:
    """Write `rows` ((index, id, image, Tokens) in index order) as `target`/samples.arrow; returns the count."""
    import pyarrow as pa

    schema, n = _schema(), 0
    columns = {name: [] for name in schema.names}

    def flush(writer):
        if columns["index"]:
            writer.write_batch(pa.record_batch([pa.array(columns[f.name], f.type) for f in schema], schema=schema))
            for values in columns.values():
                values.clear()

    with pa.OSFile(str(Path(target) / FILE), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for index, rid, image, t in rows:
            for name, value in (("index", index), ("id", rid), ("image", image), ("input_ids", t.input_ids),
                                ("labels", t.labels), ("image_at", t.image_at), ("first_label", t.first_label),
                                ("answer", t.answer), ("question", t.question), ("category", t.category)):
                columns[name].append(value)
            n += 1
            if len(columns["index"]) >= BATCH:
                flush(writer)
        flush(writer)
    (Path(target) / META).write_text(json.dumps({"format": FORMAT, "rows": n}))
    return n


class Shard:
    """Read-only, memory-mapped rows of a shard. Picklable (for DataLoader workers under spawn): the
    mapping is reopened in the process that reads, never copied."""

    def __init__(self, directory: Path | str):
        self.directory = str(directory)
        self._table = None

    def __getstate__(self):
        return {"directory": self.directory, "_table": None}

    @property
    def table(self):
        if self._table is None:
            import pyarrow as pa

            self._table = pa.ipc.open_file(pa.memory_map(str(Path(self.directory) / FILE))).read_all()
            self._starts = np.cumsum([0] + [len(c) for c in self._table.column("index").chunks])
        return self._table

    def __len__(self) -> int:
        return self.table.num_rows

    def _at(self, column: str, i: int):
        table = self.table
        chunk = int(np.searchsorted(self._starts, i, side="right")) - 1
        return table.column(column).chunks[chunk], i - int(self._starts[chunk])

    def _list(self, column: str, i: int) -> np.ndarray:
        array, j = self._at(column, i)
        offsets = array.offsets  # zero-copy views of the mapped file
        start, stop = offsets[j].as_py(), offsets[j + 1].as_py()
        return array.values.slice(start, stop - start).to_numpy(zero_copy_only=True)

    def _scalar(self, column: str, i: int):
        array, j = self._at(column, i)
        return array[j].as_py()

    def input_ids(self, i: int) -> np.ndarray:
        return self._list("input_ids", i)

    def labels(self, i: int) -> np.ndarray:
        return self._list("labels", i)

    def image(self, i: int) -> str | None:
        return self._scalar("image", i)

    def image_at(self, i: int) -> int:
        return self._scalar("image_at", i)

    def record_id(self, i: int) -> str:
        return self._scalar("id", i)

    def answer(self, i: int) -> str:
        return self._scalar("answer", i)

    def question(self, i: int) -> str:
        return self._scalar("question", i)

    def column(self, name: str) -> np.ndarray:
        """A whole scalar column as numpy: lengths and indices for the check, an eval split's categories."""
        if name == "length":
            return np.concatenate([np.diff(c.offsets.to_numpy()) for c in self.table.column("input_ids").chunks]
                                  or [np.zeros(0, dtype=np.int64)])
        return self.table.column(name).to_numpy()
