"""Preprocessing once per study: tokenized, image-preprocessed shards shared by every trial and worker.

A split encoded for one (dataset content, tokenizer, chat template, image processor,
image tokens, max length) is written to `<storage>/shards/<key>/` as an Arrow IPC
file (token ids, labels, ids, answers) plus the pixel tensor in safetensors, so
nothing read back is a pickle. The first process to need a key builds it under a
file lock and renames it into place whole; the others wait and reuse it, and a
directory left half-written by a killed process is never at the key's path.

The dataset's fingerprint hashes its JSON bytes and each referenced image's name,
size and modification time: cheap (no image is read), and any edit changes the key.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from trainables import data as D

FORMAT = 1  # bump when the layout below changes


def fingerprint(root: Path, name: str, records: list[dict]) -> str:
    h = hashlib.sha256((Path(root) / name).read_bytes())
    for image in sorted({r["image"] for r in records if "image" in r}):
        st = (Path(root) / "images" / image).stat()
        h.update(f"{image}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def key(root: Path, name: str, records: list[dict], processor, max_length: int, for_generation: bool,
        image_tokens: int | None, limit: int, image_aspect: str = "pad") -> str:
    from trainables.model import num_image_tokens

    tok = processor.tokenizer
    parts = dict(format=FORMAT, data=fingerprint(root, name, records), split=name, limit=limit,
                 vocab=hashlib.sha256(json.dumps(tok.get_vocab(), sort_keys=True).encode()).hexdigest(),
                 template=tok.chat_template, image=processor.image_processor.to_dict(),
                 image_tokens=image_tokens or num_image_tokens(processor), max_length=max_length,
                 for_generation=for_generation, image_aspect=image_aspect)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def write(data: D.Encoded, tmp: Path) -> None:
    import pyarrow as pa
    from safetensors.torch import save_file

    table = pa.table({
        "id": data.ids,
        "input_ids": [t.tolist() for t in data.input_ids],
        "labels": [t.tolist() for t in data.labels],
        "image_index": data.image_index,
        "answer": data.answers,
    })
    with pa.OSFile(str(tmp / "samples.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    if data.pixel_values is not None:
        save_file({"pixel_values": data.pixel_values.contiguous()}, str(tmp / "pixels.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({"too_long": data.too_long}))


def read(target: Path) -> D.Encoded:
    import pyarrow as pa
    from safetensors.torch import load_file

    with pa.memory_map(str(target / "samples.arrow")) as source:
        table = pa.ipc.open_file(source).read_all().to_pydict()
    pixels = target / "pixels.safetensors"
    return D.Encoded(table["id"], [torch.tensor(x, dtype=torch.long) for x in table["input_ids"]],
                     [torch.tensor(x, dtype=torch.long) for x in table["labels"]], table["image_index"],
                     load_file(str(pixels))["pixel_values"] if pixels.exists() else None, table["answer"],
                     json.loads((target / "meta.json").read_text())["too_long"])


def encoded(root: Path, name: str, processor, max_length: int, storage: Path | None, for_generation: bool = False,
            image_tokens: int | None = None, limit: int = 0,
            image_aspect: str = "pad") -> tuple[D.Encoded, bool, float]:
    """(the split, encoded; whether it came from the cache; seconds spent). No storage: encode in memory."""
    from zoo import cache

    t0 = time.perf_counter()
    records = D.read_records(root, name)
    if limit:
        records = records[:limit]
    encode = lambda: D.encode(records, processor, root, max_length, for_generation,  # noqa: E731
                              image_tokens, image_aspect)
    if storage is None or not records:
        return encode(), False, time.perf_counter() - t0
    target = Path(storage) / "shards" / key(root, name, records, processor, max_length, for_generation, image_tokens, limit,
                          image_aspect)
    with cache.locked(target):
        hit = target.exists()
        if not hit:
            with cache.building(target) as tmp:
                write(encode(), tmp)
    return read(target), hit, time.perf_counter() - t0
