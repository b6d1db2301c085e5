"""Records -> tokens with the model's chat template: only assistant turns carry loss, one token per image.

The image stays one `<image>` token here; the loader expands it into one token per image
feature (LLaVA's "one <image> token per feature" rule) when it builds a batch, so a
preprocessed shard depends only on the tokenizer and its template, not on the vision
tower or the method. Labels mark the characters of assistant turns, found by rendering
each turn's prefix with the same template (what transformers' `return_assistant_tokens_mask`
does, for templates that lack its `{% generation %}` markers, which Vicuna's do), and map
to tokens through the fast tokenizer's offsets.

Whether a record fits a trial's `max_length` with its image tokens is `length_problem`:
the dataset check asks it before Ray starts, for the worst case the space can produce.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from trainables.data.records import category_of, messages
from zoo import IMAGE_TOKEN

IGNORE = -100  # label of a token that carries no loss (transformers' convention)


@dataclass(frozen=True)
class Tokens:
    input_ids: np.ndarray  # int32, one IMAGE_TOKEN id where the image goes
    labels: np.ndarray     # int32, IGNORE except on assistant-turn tokens
    image_at: int          # position of the image token, -1 without an image
    answer: str            # the last assistant turn: the reference answer of an eval record
    question: str          # the last human turn: where a multiple-choice question lists its options
    category: str = ""     # the record's question type (records.CATEGORY), "" when it names none

    @property
    def first_label(self) -> int:
        """Position of the first token that carries loss (-1: none)."""
        hits = np.flatnonzero(self.labels != IGNORE)
        return int(hits[0]) if len(hits) else -1


def tokenize(rec: dict, tokenizer, for_generation: bool = False) -> Tokens:
    """One record with the tokenizer's chat template; `for_generation` keeps the prompt only (no labels)."""
    msgs = messages(rec["conversations"])
    question = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
    if for_generation:
        text = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        spans = []
    else:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                start = len(tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True))
                end = len(tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False))
                spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    labels = np.full(len(ids), IGNORE, dtype=np.int32)
    for j, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(a <= s < b for a, b in spans):
            labels[j] = ids[j]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    at = np.flatnonzero(ids == image_id)
    return Tokens(ids, labels, int(at[0]) if len(at) else -1, msgs[-1]["content"], question, category_of(rec))


def length_problem(length: int, image_at: int, first_label: int, image_tokens: int, max_length: int,
                   for_generation: bool) -> str | None:
    """Why a record of `length` tokens (one of them the image token at `image_at`, -1: none) cannot be
    used by a trial with `image_tokens` features per image and `max_length`, or None.

    Training records longer than max_length are cut at the end, as LLaVA does, when the cut
    keeps every image token and at least one answer token; a prompt to answer is never cut.
    """
    extra = image_tokens - 1 if image_at >= 0 else 0
    total = length + extra
    if total <= max_length:
        return None
    with_image = f" with its image ({image_tokens} image tokens)" if image_at >= 0 else ""
    if for_generation:
        return f"its prompt is {total:,} tokens{with_image}, over max_length={max_length} (a prompt is never cut)"
    if image_at >= 0 and image_at + image_tokens > max_length:
        return f"is {total:,} tokens{with_image}: max_length={max_length} would cut its image"
    first = first_label + (extra if 0 <= image_at < first_label else 0)
    if first_label < 0 or first >= max_length:
        return f"is {total:,} tokens{with_image}: none of its answer tokens fits within max_length={max_length}"
    return None


# --- many records at once, in worker processes (the check and the shard builder) ---

_TOKENIZER = None  # set in each worker process by _init (forked: the parent's object, nothing re-loaded)


def _init(tokenizer) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _chunk(args) -> list[tuple[int, Tokens | str]]:
    records, indices, for_generation = args
    out = []
    for rec, i in zip(records, indices):
        try:
            out.append((i, tokenize(rec, _TOKENIZER, for_generation)))
        except Exception as e:  # noqa: BLE001 - a template that raises on this record: a problem of the record
            out.append((i, f"cannot be rendered with the chat template: {type(e).__name__}: {e}"))
    return out


def tokenize_many(records: list, indices, tokenizer, for_generation: bool, processes: int = 1,
                  desc: str = "tokenizing", chunk: int = 256):
    """Yield (index, Tokens or a problem string) for records[i], i in `indices`, in index order, over
    `processes` worker processes (fork), with a progress bar on stderr."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    indices = list(indices)
    tasks = [([records[i] for i in indices[k:k + chunk]], indices[k:k + chunk], for_generation)
             for k in range(0, len(indices), chunk)]
    # Shown on a terminal only (disable=None), and gone when done: what stays on stderr is an `error:` line.
    bar = tqdm(total=len(indices), desc=desc, unit="record", file=sys.stderr, disable=None if indices else True,
               leave=False, mininterval=0.5)
    with bar:
        if processes <= 1 or len(tasks) < 2:
            _init(tokenizer)
            for task in tasks:
                done = _chunk(task)
                bar.update(len(done))
                yield from done
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust pool and fork do not mix
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(processes, mp_context=context, initializer=_init, initargs=(tokenizer,)) as pool:
            for done in pool.map(_chunk, tasks):  # in order: shards are written in record order
                bar.update(len(done))
                yield from done
