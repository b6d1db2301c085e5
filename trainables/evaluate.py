"""Greedy-decoding evaluation, 0-100, sharded over ranks (DESIGN.md, "Evaluation").

Short answers are scored by normalized exact match. A question that lists lettered
options (ScienceQA / MMBench style: lines `A. red`, `(B) blue`, `C: green`, or
`Options: (A) red (B) blue`) is scored by the letter the answer picks; an answer that
names no option clearly is wrong and counted as `unparsed`, never guessed.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainables.data import Encoded, collate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# One option per line: "A. red", "(B) blue", "C: green", "D) pink".
_OPTION_LINE = re.compile(r"\s*\(?([A-Z])(?:\)|[.:])\s*(\S.*?)\s*")
# Several on one line, as LLaVA's ScienceQA prompts write them: "Options: (A) red (B) blue".
_INLINE_OPTION = re.compile(r"\(([A-Z])\)\s*")
# An answer that is a letter: "B", "(B)", "B.", "B)", "B:", "B," optionally followed by the option's text.
_LETTER = re.compile(r"\(?(?P<letter>[A-Za-z])(?:\)|[.:,]|$)\s*(?P<rest>.*)", re.S)
# "B blue": a capital letter, a space, then (checked below) exactly that option's text.
_LETTER_SPACE = re.compile(r"(?P<letter>[A-Z])\s+(?P<rest>.+)", re.S)
# "The answer is B", "Answer: (B)", "the correct option is blue": what follows is parsed as an answer.
_SAID = re.compile(r"(?i:\b(?:answer|option|choice)\s*(?:is\b)?\s*:?)\s*(?P<said>.+)", re.S)


def normalize(text: str) -> str:
    """SQuAD/VQA-style answer normalization: lower case, no punctuation, articles or extra spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def options(question: str) -> dict[str, str]:
    """The lettered options a question lists, {"A": "red", "B": "blue", ...}, or {} for a short-answer question.

    Letters must run A, B, C... with at least two, so a sentence that happens to start
    with "A." is not a list of choices; the last such list in the question counts.
    """
    found: dict[str, str] = {}
    run: dict[str, str] = {}
    for line in question.splitlines():
        inline = _inline_options(line)
        if len(inline) >= 2:
            found, run = inline, {}
            continue
        m = _OPTION_LINE.fullmatch(line)
        if m and ord(m[1]) - ord("A") == len(run):
            run[m[1]] = m[2]
            continue
        if len(run) >= 2:
            found = run
        run = {m[1]: m[2]} if m and m[1] == "A" else {}
    return run if len(run) >= 2 else found


def _inline_options(line: str) -> dict[str, str]:
    parts = _INLINE_OPTION.split(line)  # [before, "A", text, "B", text, ...]
    letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if letters != [chr(ord("A") + i) for i in range(len(letters))] or not all(texts):
        return {}
    return dict(zip(letters, texts))


def choice_letter(answer: str, opts: dict[str, str]) -> str | None:
    """The option an answer picks (`B`, `(B)`, `B.`, `B. blue`, `The answer is B`, or exactly an
    option's text), or None when it names none clearly: unparsable answers are never guessed."""
    text = answer.strip()
    said = _SAID.search(text)
    for candidate in (text, said["said"].strip() if said else ""):
        letter = _pick(candidate, opts)
        if letter is not None:
            return letter
    return None


def _pick(text: str, opts: dict[str, str]) -> str | None:
    by_text = {normalize(v): k for k, v in opts.items() if normalize(v)}
    said = normalize(text)
    if said and said in by_text:
        return by_text[said]
    m = _LETTER.fullmatch(text)
    if m is None:  # "B blue" counts only when the words are B's own text
        m = _LETTER_SPACE.fullmatch(text)
        same = m is not None and normalize(m["rest"]) == normalize(opts.get(m["letter"], ""))
        return m["letter"] if same else None
    letter, rest = m["letter"].upper(), normalize(m["rest"])
    if letter not in opts:
        return None
    if rest and by_text.get(rest, letter) != letter:  # "B. green" where green is C: it contradicts itself
        return None
    return letter


def judge(prediction: str, reference: str, question: str = "") -> tuple[bool, str]:
    """(correct, how): how is "choice" (the letters agree or not), "unparsed" (a multiple-choice
    answer naming no option: wrong) or "exact" (normalized exact match, for every other question,
    including one with options whose reference answer names none of them)."""
    opts = options(question)
    want = choice_letter(reference, opts) if opts else None
    if want is None:
        return exact_match(prediction, reference), "exact"
    got = choice_letter(prediction, opts)
    if got is None:
        return False, "unparsed"
    return got == want, "choice"


@dataclass(frozen=True)
class Scores:
    score: float          # 0-100 over every question
    questions: int
    multiple_choice: int  # questions scored by their option letter
    unparsed: int         # multiple-choice answers naming no option (counted wrong)


@torch.no_grad()
def generate_answers(model, data: Encoded, idx: list[int], tokenizer, max_new_tokens: int,
                     device, batch_size: int = 32, synced: bool = False) -> list[str]:
    """Greedy answers for samples `idx`, the same at any batch size: prompts are left-padded, and
    the attention mask hides the padding (generate derives position ids from it, so each prompt
    starts at position 0 whatever its neighbours' lengths)."""
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


def question_texts(records: list[dict]) -> dict[str, str]:
    """{id: the question being answered} (the last human turn) of eval records, for `score_details`."""
    out = {}
    for rec in records:
        human = [t["value"] for t in rec["conversations"] if t["from"] == "human"]
        out[str(rec["id"])] = human[-1] if human else ""
    return out


def score_details(model, data: Encoded, tokenizer, max_new_tokens: int, device, rank: int = 0, world: int = 1,
                  synced: bool = False, questions: dict[str, str] | None = None) -> Scores:
    """Accuracy over all of `data` (each rank answers a strided shard), with how many questions
    were multiple choice and how many of their answers named no option.

    `questions` ({id: text}, see `question_texts`) is where options are looked for;
    without it, each sample's prompt is decoded back to text.
    """
    idx = list(range(rank, len(data.ids), world))
    if synced:  # ZeRO-3: every rank must run the same number of forward passes
        per_rank = -(-len(data.ids) // world)
        idx += idx[:1] * (per_rank - len(idx))
    preds = generate_answers(model, data, idx, tokenizer, max_new_tokens, device, synced=synced)
    tail = None if questions is not None else _generation_prompt(tokenizer)
    seen: set[int] = set()
    totals = torch.zeros(4, dtype=torch.float64)  # hits, questions, multiple choice, unparsed
    for i, p in zip(idx, preds):
        if i in seen:
            continue
        seen.add(i)
        if questions is not None:
            asked = questions.get(str(data.ids[i]), "")
        else:
            asked = _prompt(tokenizer, data.input_ids[i], tail)
        correct, how = judge(p, data.answers[i], asked)
        totals += torch.tensor([correct, 1, how != "exact", how == "unparsed"], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    hits, n, mc, unparsed = totals.tolist()
    return Scores(100.0 * hits / max(n, 1), int(n), int(mc), int(unparsed))


def score(model, data: Encoded, tokenizer, max_new_tokens: int, device, rank: int = 0, world: int = 1,
          synced: bool = False) -> float:
    """Accuracy (0-100) over all of `data`; `score_details` also says how many answers were unparsable."""
    return score_details(model, data, tokenizer, max_new_tokens, device, rank, world, synced).score


def _generation_prompt(tokenizer) -> str:
    """What the chat template appends after the last user turn ("ASSISTANT:"), as decoded text."""
    marker = "\x00question\x00"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                                 add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that refuses this probe: nothing to cut
        return ""
    tail = rendered.split(marker)[-1]
    for special in tokenizer.all_special_tokens:
        tail = tail.replace(special, "")
    return tail.strip()


def _prompt(tokenizer, input_ids, tail: str) -> str:
    """A sample's prompt as text, without special tokens (the image placeholders go) and without the
    generation prompt, which would otherwise end the last option's line ("B. blue ASSISTANT:")."""
    text = tokenizer.decode(input_ids, skip_special_tokens=True).rstrip()
    return text[: -len(tail)].rstrip() if tail and text.endswith(tail) else text
