"""The records of a LLaVA-format dataset: its files, their structure, and what is wrong with them.

A dataset directory (DESIGN.md, "Data") holds train.json, optional eval.json and
captions.json (LLaVA format, images under images/) and optional text.json and
text_eval.json (ShareGPT format, language-only). Ids are strings or numbers and may
repeat: LLaVA-Instruct-150K gives one COCO image several conversations under the image's
id. A problem is one line naming the file and the record (id, or position when it has
none); user strings in it are escaped (`images.quoted`), so a name with a newline or an
escape sequence cannot break the line or the terminal.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from trainables.data.images import quoted
from zoo import IMAGE_TOKEN

# File name -> whether its records may hold an image (LLaVA format) or are language-only (ShareGPT).
FILES = {"train.json": True, "eval.json": True, "captions.json": True, "text.json": False, "text_eval.json": False}
REQUIRED = "train.json"
ROLES = {"human": "user", "gpt": "assistant"}
# A record's question type (optional): its held-out score is also logged per category (`score/<category>`),
# as LLaVA-Bench's questions and lmms-eval's tasks name theirs.
CATEGORY = "category"
MAX_CATEGORY_CHARS = 64


@dataclass(frozen=True)
class Problem:
    file: str                 # relative to its dataset's root, e.g. "train.json"
    record_id: str | None     # None: the record has no usable id (see `index`), or a whole-file problem
    message: str
    index: int | None = None  # the record's position in its file; None: the file as a whole is unusable
    root: str = ""            # the dataset the file belongs to ("" = the report's root)

    def where(self, root: Path) -> str:
        path = printable(str(Path(self.root or root) / self.file))
        if self.index is None:
            return path
        rid = quoted(self.record_id) if self.record_id is not None else f"#{self.index}"
        return f"{path} record {rid}"


@dataclass
class Report:
    """What the dataset check found. Problems come in file order (FILES), then record order."""
    root: Path
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)   # records per file that parsed
    digests: dict[str, str] = field(default_factory=dict)  # sha256 of every file read
    notes: list[str] = field(default_factory=list)         # what the study does about optional files

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def fatal(self) -> list[Problem]:
        """Problems of a whole file (it does not parse, or train.json is missing): dropping records cannot fix them."""
        return [p for p in self.problems if p.index is None]

    def bad(self, file: str, root: str = "") -> set[int]:
        """Positions of the records of `file` that have a problem."""
        return {p.index for p in self.problems if p.file == file and p.root == root and p.index is not None}

    def skipped(self) -> list[dict]:
        """The records --skip-invalid drops, each with every reason (what data/skipped.json holds)."""
        out: dict[tuple[str, str, int], dict] = {}
        for p in self.problems:
            if p.index is not None:
                entry = out.setdefault((p.root, p.file, p.index), {
                    "file": str(Path(p.root) / p.file) if p.root else p.file, "id": p.record_id,
                    "index": p.index, "reasons": []})
                if p.message not in entry["reasons"]:
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

    def sort(self) -> None:
        order = {name: n for n, name in enumerate(FILES)}
        self.problems.sort(key=lambda p: (p.index is not None, p.root, order.get(p.file, len(order)), p.index or 0))


def read(root: Path, name: str, report: Report, required: bool = False, tag: str = "") -> list | None:
    """The file's records, or None (absent, or a whole-file problem recorded in `report` under `tag`)."""
    path = Path(root) / name
    if not path.is_file():
        if required:
            report.problems.append(Problem(name, None, "does not exist (every dataset needs its training records)",
                                           root=tag))
        return None
    raw = path.read_bytes()
    report.digests[f"{tag}{name}"] = hashlib.sha256(raw).hexdigest()
    try:  # decoded as the loaders read it: UTF-8 text, so a byte-order mark fails here as it would there
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        report.problems.append(Problem(name, None, f"byte {e.start}: not UTF-8 text", root=tag))
        return None
    except json.JSONDecodeError as e:
        report.problems.append(Problem(name, None, f"line {e.lineno} column {e.colno}: not valid JSON: {e.msg}",
                                       root=tag))
        return None
    except RecursionError:  # json's C decoder gives up on deeply nested values with Python's recursion limit
        report.problems.append(Problem(name, None, "is nested too deeply to be a list of records", root=tag))
        return None
    if not isinstance(records, list):
        report.problems.append(Problem(name, None, f"the top level is a JSON {_kind(records)}, "
                                                   "expected a list of records", root=tag))
        return None
    return records


def record_id(rec) -> str | None:
    """A record's id as a string (LLaVA's ids are strings or integers, even mixed in one file), or None."""
    rid = rec.get("id") if isinstance(rec, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        return None
    return str(rid)


def check_record(rec, may_have_images: bool = True) -> tuple[str | None, list[str]]:
    """(the record's id or None, what is wrong with it). Checks everything but the image file itself."""
    if not isinstance(rec, dict):
        return None, [f"is a JSON {_kind(rec)}, expected an object with id and conversations"]
    problems = []
    rid = record_id(rec)
    if rid is None:
        raw = rec.get("id")
        problems.append("has no id" if raw is None or raw == "" else
                        f"id {quoted(raw)} should be a string or an integer")
    conv = rec.get("conversations")
    if conv is None:
        return rid, problems + ["has no conversations"]
    if not isinstance(conv, list) or not conv:
        return rid, problems + ["conversations should be a non-empty list of turns"]
    turn_problem = _check_turns(conv)
    if turn_problem:
        return rid, problems + [turn_problem]
    return rid, problems + _check_category(rec) + _check_image_field(rec, conv, may_have_images)


def _check_category(rec: dict) -> list[str]:
    if CATEGORY not in rec:
        return []
    value = rec[CATEGORY]
    if (not isinstance(value, str) or not re.search(r"\w", value) or len(value) > MAX_CATEGORY_CHARS
            or not value.isprintable()):
        return [f"{CATEGORY} should name the question's type in 1 to {MAX_CATEGORY_CHARS} printable characters, "
                "a letter or digit among them, "
                f"got {quoted(value) if isinstance(value, str) else 'a JSON ' + _kind(value)}"]
    return []


def category_of(rec: dict) -> str:
    """The record's question type ("" when it names none)."""
    return rec.get(CATEGORY, "").strip()


def _check_turns(conv: list) -> str | None:
    """The first structural problem of a conversation (one reason is enough; later ones would cascade)."""
    for n, turn in enumerate(conv, 1):
        if not isinstance(turn, dict):
            return f"turn {n} is a JSON {_kind(turn)}, expected an object with from and value"
        who = turn.get("from")
        if who not in ROLES:
            return f"turn {n} is from {quoted(who)}, expected one of {sorted(ROLES)}"
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
        return [f"image should be one file name under images/, got {quoted(image)}"]
    if IMAGE_TOKEN not in conv[0]["value"]:
        return [f"has an image but no {IMAGE_TOKEN} in its first human turn"]
    if uses > 1:
        return [f"{IMAGE_TOKEN} appears {uses} times; a record has one image, marked once in its first human turn"]
    return []


def printable(text: str) -> str:
    """A path or name inside a message, with unprintable characters (a newline, an escape) escaped."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns as chat-template messages."""
    return [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in conversations]


def _kind(value) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)
