"""The dataset check, a promise: what it passes, every trial of the study can train and be scored on.

    report, plan = check(root, encodings, storage=DIR, ...)    # before Ray starts; plan is None on problems

It runs, before Ray starts (and for `--dry-run`), the same code the trials run:
- every file parsed and every record's structure checked (trainables.data.records);
- every image resolved inside the dataset and decoded fully by `images.load`, the
  loader's own function, in parallel processes with a progress bar; verdicts cached by
  file fingerprint under $MMSCALE_CACHE/verdicts, so a rerun is instant;
- every record tokenized with each tokenizer the space can produce and its chat template,
  and measured against the worst case of those trials: the most image tokens per image
  and the smallest max_length (an over-long record is a problem, never a surprise after
  stage 1);
- every file the recipe needs: an eval split (eval.json, or a seeded share of train held
  out, grouped by image so no image is on both sides), caption pairs for stage 1 (its own
  captions.json or `stage1` DIR's; without them stage 1 is skipped and said), language-only
  data for mixing (checked by the study against the space's mix_ratio).
The same pass writes the shards trials read (when `storage` is given and `write`), one per
split and tokenizer: trials never parse the JSON, and read nothing the check did not pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainables.data import images, records, shards, tokens
from trainables.data.records import FILES, REQUIRED, Problem, Report

# A dataset without eval.json is scored on a seeded share of train held out: 5% of its
# images (LLaVA-Bench-sized evals are ~100-1000 questions), at least one, at most 1,000.
HOLDOUT_SHARE, HOLDOUT_MAX = 0.05, 1000
SPLITS = ("train", "eval", "captions", "text", "text_eval")
GENERATION = {"eval", "text_eval"}  # splits scored by generation: prompts only


@dataclass(frozen=True)
class Encoding:
    """What the trials sharing a tokenizer need of the data (the worst case the space can produce)."""
    tokenizer: object      # a transformers tokenizer with the chat template the trials use
    image_tokens: int      # the most features per image of those trials (576 for CLIP-L/14 at 336 px)
    max_length: int        # the smallest max_length of those trials
    name: str = ""         # how messages name it, e.g. "model_size 1m"

    @property
    def key(self) -> str:
        return shards.tokenizer_key(self.tokenizer)


@dataclass(frozen=True)
class Split:
    """One preprocessed split as a trial reads it: a shard, where its images are, the rows to skip."""
    name: str
    shard: str             # the shard's directory
    images: str            # the images folder its `image` names resolve in
    rows: int              # rows in the shard
    dropped: tuple[int, ...] = ()  # shard rows a trial never reads (bad records with --skip-invalid, held-out ones)
    tokens: int = 0        # text tokens over the rows (one <image> token each): what the cost forecast reads
    image_rows: int = 0    # rows with an image

    @property
    def used(self) -> int:
        return self.rows - len(self.dropped)


@dataclass(frozen=True)
class DataPlan:
    """Everything trials need to read the study's data; built once by `check`, passed to every trial."""
    root: str
    splits: dict = field(default_factory=dict)  # tokenizer key -> {split name -> Split}
    holdout: int = 0        # train.json records held out as the eval split (0: the dataset has eval.json)
    stage1: str = ""        # the caption file stage 1 aligns on ("" when there is none: stage 1 is skipped)

    def split(self, tokenizer_key: str, name: str) -> Split | None:
        return self.splits.get(tokenizer_key, {}).get(name)

    def used(self, name: str) -> int:
        """Records of a split a trial reads (the same for every tokenizer)."""
        found = [s[name].used for s in self.splits.values() if name in s]
        return min(found) if found else 0


@dataclass
class _Source:
    """One split's records before tokenization: which file of which dataset, which records."""
    name: str              # the split: train, eval, captions, text, text_eval
    file_key: str          # its FILES entry (eval held out of train: "train.json")
    root: Path
    file: str              # the file's name in its dataset
    tag: str               # Problem.root: "" for the dataset itself, the other dataset's path for --stage1-data
    records: list
    rows: list[int]        # record indices in the shard, in order
    digest: str            # of `rows`


def verdict_cache(images_root: Path) -> Path:
    """Where the image verdicts of one images folder are kept (by its resolved path)."""
    from zoo import cache_dir

    where = hashlib.sha256(os.path.realpath(images_root).encode()).hexdigest()[:16]
    return cache_dir() / "verdicts" / f"{where}.json"


def check(root: Path, encodings: list[Encoding], *, stage1: Path | None = None, storage: Path | None = None,
          write: bool = True, skip_invalid: bool = False, seed: int = 0, processes: int | None = None,
          progress: bool = True) -> tuple[Report, DataPlan | None]:
    """Check the dataset at `root` (and the caption pairs at `stage1`) for trials with these encodings.

    Returns the report and, unless it has a problem that stops the study (any, without
    `skip_invalid`; a whole-file one, or nothing left to train or score on, with it), the
    data plan. Shards go to `storage`/shards when `write`; a dry run (write=False) only
    measures, reusing shards it finds there.
    """
    root = Path(root).resolve()
    processes = processes or images._cpus()
    report = Report(root)
    files = {name: (root, name, "") for name in FILES}  # FILES name -> (dataset root, file name, Problem.root)
    if stage1 is not None:
        s1 = Path(stage1).resolve()
        files["captions.json"] = (s1, "captions.json" if (s1 / "captions.json").is_file() else "train.json", str(s1))
    found = {name: records.read(where, file, report, required=name == REQUIRED or bool(tag), tag=tag)
             for name, (where, file, tag) in files.items()}
    if report.fatal:
        report.sort()
        return report, None

    usable: dict[str, list[int]] = {}  # FILES name -> records whose structure is sound (they tokenize)
    for name, recs in found.items():
        if recs is None:
            continue
        where, file, tag = files[name]
        report.counts[str(Path(tag) / file) if tag else file] = len(recs)
        usable[name] = []
        for i, rec in enumerate(recs):
            rid, problems = records.check_record(rec, FILES[name])
            report.problems += [Problem(file, rid, m, i, tag) for m in problems]
            if not problems:
                usable[name].append(i)
    _check_images(found, usable, files, report, processes, progress)

    sources, holdout = _sources(found, usable, files, report, seed)
    if report.fatal:
        report.sort()
        return report, None
    plan_splits: dict[str, dict[str, Split]] = {}
    for enc in encodings:
        plan_splits[enc.key] = {src.name: _tokenized(src, report, enc, storage, write, processes, progress)
                                for src in sources}
    _notes(report, found, files, holdout, stage1)

    # what trials skip: the rows of every record with a problem, and the held-out rows of train
    for enc_splits in plan_splits.values():
        for src in sources:
            split = enc_splits[src.name]
            skip = report.bad(src.file, src.tag) | (holdout if src.name == "train" else set())
            enc_splits[src.name] = Split(split.name, split.shard, split.images, split.rows,
                                         tuple(r for r, i in enumerate(src.rows) if i in skip), split.tokens,
                                         split.image_rows)
    report.sort()
    if report.problems and not skip_invalid:
        return report, None
    first = plan_splits[encodings[0].key] if encodings else {}
    for name, key in (("train", REQUIRED), ("eval", "eval.json" if found["eval.json"] is not None else REQUIRED)):
        if name in first and first[name].used == 0:
            what = "train on" if name == "train" else "score on (a score over zero questions is not a number)"
            n = len(found[key])
            why = f"has no records: there is nothing to {what}" if not n else \
                f"none of its {n} records is usable: nothing is left to {what} (first: {_first(report)})"
            report.problems.insert(0, Problem(key, None, why))
            return report, None
    stage1_file = str(Path(files["captions.json"][0]) / files["captions.json"][1])
    return report, DataPlan(str(root), plan_splits, len(holdout), stage1_file if "captions" in first else "")


def _first(report: Report) -> str:
    p = next((p for p in report.problems if p.index is not None), None)
    return f"{p.where(report.root)}: {p.message}" if p else "-"


def _check_images(found, usable, files, report: Report, processes: int, progress: bool) -> None:
    """Decode the image of every sound record once per images folder, with `images.check_images`."""
    by_folder: dict[Path, list[tuple[str, int]]] = {}
    for name, recs in found.items():
        if recs is not None:
            for i in usable[name]:
                if "image" in recs[i]:
                    by_folder.setdefault(files[name][0] / "images", []).append((name, i))
    for images_root, users in by_folder.items():
        verdicts = images.check_images(images_root, [found[n][i]["image"] for n, i in users], processes=processes,
                                       cache=verdict_cache(images_root), progress=progress)
        for name, i in users:
            rec = found[name][i]
            why = verdicts.get(rec["image"])
            if why:
                _, file, tag = files[name]
                report.problems.append(Problem(file, records.record_id(rec),
                                               f"image {images.quoted(rec['image'])} {why}", i, tag))


def _sources(found, usable, files, report: Report, seed: int) -> tuple[list[_Source], set[int]]:
    """The splits as records: train, eval (its own file, or held out of train), captions, text, text_eval."""
    out, holdout = [], set()

    def source(split: str, name: str, rows: list[int]) -> _Source:
        where, file, tag = files[name]
        digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
        return _Source(split, name, where, file, tag, found[name], rows, digest)

    out.append(source("train", REQUIRED, usable[REQUIRED]))
    if found["eval.json"] is not None:
        out.append(source("eval", "eval.json", usable["eval.json"]))
    else:
        sound = [i for i in usable[REQUIRED] if i not in report.bad(REQUIRED)]
        holdout = held_out(found[REQUIRED], sound, seed)
        if not holdout:
            report.problems.append(Problem(REQUIRED, None, f"has {len(sound)} usable record(s) and the dataset has "
                                                           "no eval.json: too few to hold some out to score on "
                                                           "(add eval.json)"))
            return out, holdout
        out.append(source("eval", REQUIRED, sorted(holdout)))
    for name, split in (("captions.json", "captions"), ("text.json", "text"), ("text_eval.json", "text_eval")):
        if found[name] is not None:
            out.append(source(split, name, usable[name]))
    return out, holdout


def held_out(train: list, usable: list[int], seed: int) -> set[int]:
    """A seeded share of train's usable records to score on, whole images at a time (LLaVA-Instruct gives
    one image several conversations: splitting them would score the model on images it trained on)."""
    groups: dict[str, list[int]] = {}
    for i in usable:
        image = train[i].get("image")
        groups.setdefault(image if isinstance(image, str) else f"#{i}", []).append(i)
    if len(groups) < 2:
        return set()
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    want = max(1, min(HOLDOUT_MAX, round(HOLDOUT_SHARE * len(usable))))
    chosen: set[int] = set()
    for name in names[:-1]:  # never all of them: something is left to train on
        if len(chosen) >= want:
            break
        chosen.update(groups[name])
    return chosen


def _tokenized(src: _Source, report: Report, enc: Encoding, storage: Path | None, write: bool, processes: int,
               progress: bool) -> Split:
    """The split's shard for this tokenizer (built, reused, or only measured on a dry run); the length
    problems of its records go into `report`."""
    from zoo import cache

    generation = src.name in GENERATION
    digest = report.digests[src.tag + src.file]
    name = shards.key({"data": digest, "rows": src.digest, "tokenizer": enc.key, "generation": generation})
    target = Path(storage) / "shards" / name if storage is not None else None
    images_root = str((src.root / "images").resolve())
    recs, seen = src.records, set()
    count = {"tokens": 0, "images": 0}

    def measure(length: int, image_at: int, first_label: int, i: int) -> None:
        count["tokens"] += length
        count["images"] += image_at >= 0
        why = tokens.length_problem(length, image_at, first_label, enc.image_tokens, enc.max_length, generation)
        if why and (i, why) not in seen:  # one line per record, also when two splits hold it
            seen.add((i, why))
            report.problems.append(Problem(src.file, records.record_id(recs[i]),
                                           f"{why} ({enc.name})" if enc.name else why, i, src.tag))

    def rows():
        desc = f"tokenizing {src.name}" + (f" ({enc.name})" if enc.name else "")
        for i, t in tokens.tokenize_many(recs, src.rows, enc.tokenizer, generation, processes, desc=desc):
            if isinstance(t, str):  # the template raised on it: a problem of the record, no row
                report.problems.append(Problem(src.file, records.record_id(recs[i]), t, i, src.tag))
                t = tokens.Tokens(np.zeros(0, np.int32), np.zeros(0, np.int32), -1, "", "")
            else:
                measure(len(t.input_ids), t.image_at, t.first_label, i)
            yield i, records.record_id(recs[i]), recs[i].get("image"), t

    if target is not None and (target / shards.META).is_file():  # built before: measured from its columns
        shard = shards.Shard(target)
        index, length = shard.column("index"), shard.column("length")
        at, first = shard.column("image_at"), shard.column("first_label")
        for r in range(len(index)):
            measure(int(length[r]), int(at[r]), int(first[r]), int(index[r]))
        return Split(src.name, str(target), images_root, len(index), (), count["tokens"], count["images"])
    if target is not None and write:
        cache.ensure(target, lambda tmp: shards.write(tmp, rows()))
        if not count["tokens"]:  # built by another process meanwhile: measure it as a reused shard
            return _tokenized(src, report, enc, storage, False, processes, progress)
        return Split(src.name, str(target), images_root, len(shards.Shard(target)), (), count["tokens"],
                     count["images"])
    n = sum(1 for _ in rows())  # a dry run: measured, not written
    return Split(src.name, "", images_root, n, (), count["tokens"], count["images"])


def _notes(report: Report, found, files, holdout: set[int], stage1) -> None:
    if found["eval.json"] is None and holdout:
        share = len(holdout) / max(1, len(found[REQUIRED]))
        report.notes.append(f"no eval.json: {len(holdout):,} records of train.json ({share:.1%}, whole images, "
                            "seeded) are held out as the eval split and not trained on")
    if found["captions.json"] is None:
        report.notes.append("no caption pairs (captions.json, or --stage1-data DIR): stage 1 is skipped, the "
                            "projector starts untrained and trials log stage1_steps 0")
    elif stage1 is not None:
        where, file, _ = files["captions.json"]
        report.notes.append(f"stage 1 aligns on {where / file} ({len(found['captions.json']):,} caption pairs)")
