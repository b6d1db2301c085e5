"""Check a LLaVA-format dataset before any trial reads it, and write a copy without its bad records.

    python -m trainables.dataset DIR        # every problem, one line each; exit 2 if there is any

A dataset directory (DESIGN.md, "Data") holds train.json, optional eval.json and
captions.json (LLaVA format, images under images/) and optional text.json and
text_eval.json (ShareGPT format, language-only). The whole of it is checked up front,
so a missing image or a conversation that does not alternate is one `error:` line
naming the file and record before Ray starts, not a trial that fails an hour in.
`study.run --skip-invalid` drops the bad records instead: `write_filtered` writes a
copy of the JSON files without them (images are linked, not copied), and the dropped
ids with their reasons, which the study logs to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from zoo import IMAGE_TOKEN
from trainables.data import ROLES

# File name -> whether its records may hold an image (LLaVA format) or are language-only (ShareGPT).
FILES = {"train.json": True, "eval.json": True, "captions.json": True, "text.json": False, "text_eval.json": False}
REQUIRED = "train.json"
SKIPPED = "skipped.json"  # in a filtered copy: the dropped records and why
# A truncated JPEG passes PIL's verify (it checks only the header); its end-of-image marker is
# missing instead. Looked for near the end, not at it, as some writers pad after the marker.
JPEG_END, JPEG_TAIL = b"\xff\xd9", 4096
IMAGES_PER_TASK = 256  # images checked per thread-pool task: few futures even for a million images


@dataclass(frozen=True)
class Problem:
    file: str                 # relative to the dataset root, e.g. "train.json"
    record_id: str | None     # None: the record has no usable id (see `index`), or a whole-file problem
    message: str
    index: int | None = None  # the record's position in its file; None: the file as a whole is unusable

    def where(self, root: Path) -> str:
        path = Path(root) / self.file
        if self.index is None:
            return str(path)
        return f"{path} record {self.record_id!r}" if self.record_id is not None else f"{path} record #{self.index}"


@dataclass
class Report:
    """What `validate` found. Problems come in file order (FILES), then record order."""
    root: Path
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)   # records per file that parsed
    digests: dict[str, str] = field(default_factory=dict)  # sha256 of every file read

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def fatal(self) -> list[Problem]:
        """Problems of a whole file (it does not parse, or train.json is missing): dropping records cannot fix them."""
        return [p for p in self.problems if p.index is None]

    @property
    def bad_ids(self) -> dict[str, set[str]]:
        """Ids of the records with problems, per file (`#<index>` for a record without an id)."""
        out: dict[str, set[str]] = {}
        for p in self.problems:
            if p.index is not None:
                out.setdefault(p.file, set()).add(p.record_id if p.record_id is not None else f"#{p.index}")
        return out

    def skipped(self) -> list[dict]:
        """The records --skip-invalid drops, each with every reason (what data/skipped.json holds)."""
        out: dict[tuple[str, int], dict] = {}
        for p in self.problems:
            if p.index is not None:
                entry = out.setdefault((p.file, p.index), {"file": p.file, "id": p.record_id, "index": p.index,
                                                           "reasons": []})
                entry["reasons"].append(p.message)
        return list(out.values())

    def first_error_line(self) -> str:
        """One line for the CLI's stderr: the first problem (a fatal one first), and how many more."""
        fatal = self.fatal
        first = (fatal or self.problems)[0]
        line = f"error: {first.where(self.root)}: {first.message}"
        more = len(self.problems) - 1
        notes = [f"and {more} more problem{'s' if more != 1 else ''}"] if more else []
        if not fatal:
            n = len(self.skipped())
            notes.append(f"--skip-invalid drops the {n} bad record{'s' if n != 1 else ''}")
        return line + (f" ({'; '.join(notes)})" if notes else "")

    def fingerprint(self) -> str:
        """Names a filtered copy: the dataset's place, its files' contents and what is dropped."""
        h = hashlib.sha256(str(Path(self.root).resolve()).encode())
        for name in sorted(self.digests):
            h.update(f"{name}:{self.digests[name]}".encode())
        h.update(json.dumps([(s["file"], s["index"]) for s in self.skipped()]).encode())
        return h.hexdigest()[:16]


def validate(root: Path, threads: int | None = None) -> Report:
    """Check every file, record and image of the dataset at `root`; never raises on bad data."""
    root = Path(root)
    report = Report(root)
    users: dict[str, list[tuple[str, str | None, int]]] = {}  # image name -> (file, id, index) of its records
    for name, may_have_images in FILES.items():
        records = _load(root, name, report)
        if records is None:
            continue
        report.counts[name] = len(records)
        first_seen: dict[str, int] = {}
        for i, rec in enumerate(records):
            rid, messages = check_record(rec, may_have_images)
            if rid is not None:
                if rid in first_seen:
                    messages.append(f"duplicate id: record #{first_seen[rid]} has it too")
                first_seen.setdefault(rid, i)
            report.problems += [Problem(name, rid, m, i) for m in messages]
            if not messages and "image" in rec:
                users.setdefault(rec["image"], []).append((name, rid, i))
    for image, why in _check_images(root, sorted(users), threads).items():
        report.problems += [Problem(f, rid, f"image {Path('images') / image} {why}", i) for f, rid, i in users[image]]
    order = {name: n for n, name in enumerate(FILES)}
    report.problems.sort(key=lambda p: (p.index is not None, order[p.file], p.index or 0))
    return report


def _load(root: Path, name: str, report: Report) -> list | None:
    """The file's records, or None (absent, or a whole-file problem recorded in `report`)."""
    path = root / name
    if not path.is_file():
        if name == REQUIRED:
            report.problems.append(Problem(name, None, "does not exist (every dataset needs its training records)"))
        return None
    raw = path.read_bytes()
    report.digests[name] = hashlib.sha256(raw).hexdigest()
    try:  # decoded as the loaders read it: UTF-8 text, so a byte-order mark fails here as it would there
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        report.problems.append(Problem(name, None, f"byte {e.start}: not UTF-8 text"))
        return None
    except json.JSONDecodeError as e:
        report.problems.append(Problem(name, None, f"line {e.lineno} column {e.colno}: not valid JSON: {e.msg}"))
        return None
    if not isinstance(records, list):
        report.problems.append(Problem(name, None, f"the top level is a JSON {_kind(records)}, "
                                                   "expected a list of records"))
        return None
    return records


def check_record(rec, may_have_images: bool = True) -> tuple[str | None, list[str]]:
    """(the record's id or None, what is wrong with it). Checks everything but the image file itself."""
    if not isinstance(rec, dict):
        return None, [f"is a JSON {_kind(rec)}, expected an object with id and conversations"]
    problems = []
    rid = rec.get("id")
    if rid is None or rid == "":
        problems.append("has no id")
        rid = None
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
        problems.append(f"id {rid!r} should be a string")
        rid = None
    else:
        rid = str(rid)
    conv = rec.get("conversations")
    if conv is None:
        return rid, problems + ["has no conversations"]
    if not isinstance(conv, list) or not conv:
        return rid, problems + ["conversations should be a non-empty list of turns"]
    turn_problem = _check_turns(conv)
    if turn_problem:
        return rid, problems + [turn_problem]
    return rid, problems + _check_image_field(rec, conv, may_have_images)


def _check_turns(conv: list) -> str | None:
    """The first structural problem of a conversation (one reason is enough; later ones would cascade)."""
    for n, turn in enumerate(conv, 1):
        if not isinstance(turn, dict):
            return f"turn {n} is a JSON {_kind(turn)}, expected an object with from and value"
        who = turn.get("from")
        if who not in ROLES:
            return f"turn {n} is from {who!r}, expected one of {sorted(ROLES)}"
        expected = "human" if n % 2 else "gpt"
        if who != expected:
            return f"turn {n} is from {who!r} where {expected!r} belongs (turns alternate human, gpt, human first)"
        if not isinstance(turn.get("value"), str):
            return f"turn {n} has no text value"
    if conv[-1]["from"] != "gpt":
        return "ends with a human turn: there is no answer to learn or score"
    return None


def _check_image_field(rec: dict, conv: list, may_have_images: bool) -> list[str]:
    """The image field and the `<image>` placeholder agree: one image, marked once in the first human turn."""
    uses = sum(turn["value"].count(IMAGE_TOKEN) for turn in conv)
    if "image" not in rec:
        return [f"{IMAGE_TOKEN} is in its conversation but it has no image field"] if uses else []
    if not may_have_images:
        return ["has an image, but this file holds language-only records (ShareGPT format)"]
    image = rec["image"]
    if not isinstance(image, str) or not image:
        return [f"image should be one file name under images/, got {image!r}"]
    if IMAGE_TOKEN not in conv[0]["value"]:
        return [f"has an image but no {IMAGE_TOKEN} in its first human turn"]
    if uses > 1:
        return [f"{IMAGE_TOKEN} appears {uses} times; a record has one image, marked once in its first human turn"]
    return []


def _check_images(root: Path, names: list[str], threads: int | None) -> dict[str, str]:
    """{image name: why it would not load} over distinct names, each checked once, on a thread pool.

    Threads overlap file reads, which dominate on a cluster's network file system. From
    page cache the check is CPU-bound Python in PIL, where threads contend for the GIL:
    on 2 cores the synthetic world's 6,400 images take ~0.37 s on 1 thread, ~0.5 s on 2
    and ~0.85 s on 4; hence a pool no wider than the machine's cores (at most 8).
    """
    chunks = [names[i:i + IMAGES_PER_TASK] for i in range(0, len(names), IMAGES_PER_TASK)]
    workers = threads or min(8, os.cpu_count() or 1)

    def check(chunk: list[str]) -> list[tuple[str, str | None]]:
        return [(name, image_problem(root / "images" / name)) for name in chunk]

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks)))) as pool:
        return {name: why for chunk in pool.map(check, chunks) for name, why in chunk if why}


def image_problem(path: Path) -> str | None:
    """Why the image at `path` would not load for training, or None.

    `Image.open` + `verify()` checks the header and, for PNG, every chunk's checksum
    without decoding pixels: training decodes each image once anyway, and validation
    should not be a second decode of the whole dataset. JPEG's verify checks only the
    header, so a truncated JPEG is caught by its missing end-of-image marker instead.
    """
    if not path.is_file():
        return "does not exist"
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - JPEG_TAIL))
                if JPEG_END not in f.read():
                    return "does not decode: the JPEG has no end-of-image marker (truncated)"
    except UnidentifiedImageError:
        return "is not an image file PIL can read"
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the finding is the same: it will not load
        return f"does not decode: {e}"
    return None


def _kind(value) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def write_filtered(root: Path, report: Report, out_dir: Path) -> Path:
    """A copy of the dataset at `out_dir` without the records `report` found bad; returns `out_dir`.

    JSON files with nothing to drop are copied byte for byte (so content hashes such as
    the stage-1 cache key stay the same); `images` is a symlink to the original's, which
    the loaders read through as `root/images/<name>`. SKIPPED lists what was dropped and
    why. Written into a temporary sibling and renamed into place whole; an existing
    `out_dir` (the same fingerprint) is reused as it is.
    """
    if report.fatal:
        raise ValueError(f"cannot filter {root}: {report.first_error_line()}")
    root, out_dir = Path(root).resolve(), Path(out_dir)
    if out_dir.exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    drop: dict[str, set[int]] = {}
    for s in report.skipped():
        drop.setdefault(s["file"], set()).add(s["index"])
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp-"))
    try:
        for name in report.counts:
            if name in drop:
                records = json.loads((root / name).read_bytes())
                kept = [rec for i, rec in enumerate(records) if i not in drop[name]]
                (tmp / name).write_text(json.dumps(kept, ensure_ascii=False), encoding="utf-8")
            else:
                shutil.copyfile(root / name, tmp / name)
        if (root / "images").is_dir():
            (tmp / "images").symlink_to(root / "images", target_is_directory=True)
        (tmp / SKIPPED).write_text(json.dumps(report.skipped(), indent=1, ensure_ascii=False), encoding="utf-8")
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not out_dir.exists():  # else a concurrent study wrote the same copy first: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # removes the symlink, never what it points to
    return out_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m trainables.dataset DIR", file=sys.stderr)
        return 2
    report = validate(Path(argv[0]))
    for p in report.problems:
        print(f"{p.where(report.root)}: {p.message}")
    total, n, bad = sum(report.counts.values()), len(report.problems), len(report.skipped())
    print(f"{total} records in {', '.join(report.counts) or 'no readable file'}: "
          f"{n} problem{'s' if n != 1 else ''} in {bad} record{'s' if bad != 1 else ''}")
    return 0 if report.ok else 2


if __name__ == "__main__":
    sys.exit(main())
