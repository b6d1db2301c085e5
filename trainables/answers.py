"""Answers parsed as benchmarks write them: option letters for multiple choice, exact match otherwise.

A question that lists lettered options (ScienceQA / MMBench style: lines `A. red`, `(B) blue`,
`C: green`, `D) pink`, or inline `Options: (A) red (B) blue` as LLaVA's ScienceQA prompts write
them) is scored by the letter the answer picks; every other question by normalized exact match.
Predictions and references are parsed alike, so a reference may be "B" or "The answer is B." or a
whole LLaVA ScienceQA target ("LECTURE: ... SOLUTION: ... The answer is B.").

An answer that names no option clearly is `unparsed`: a letter that is not an option, an answer that
contradicts itself ("B. green" where green is C) and anything unrecognisable return None, never a
guess. This module is standalone (the standard library only).
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")

# ---- options, as questions list them -------------------------------------------------------------
# One option per line: "A. red", "(B) blue", "C: green", "D) pink".
_OPTION_LINE = re.compile(r"\s*\(?([A-Z])(?:\)|[.:])\s*(\S.*?)\s*")
# Several on one line, as LLaVA's ScienceQA prompts write them: "Options: (A) red (B) blue".
_INLINE_OPTION = re.compile(r"\(([A-Z])\)\s*")

# ---- answers -------------------------------------------------------------------------------------
# Markdown emphasis and code marks carry no meaning here: "**B**", "**Answer:** B", "`B`".
_MARKUP = re.compile(r"\*+|_{2,}|`+")
# LLaVA's answer-first ScienceQA targets ("The answer is A. BECAUSE: <lecture> <solution>"): what
# follows BECAUSE: is the explanation, which may mention other options, and states no answer.
_EXPLANATION = re.compile(r"\bBECAUSE:", re.I)
# A choice, read where a statement puts one: an optional "option"/"choice"/"letter" word, then a
# letter in brackets ("(B)", "[b]") or standing alone as a word ("B", not "Blue" or "I'm"), then
# what closes it (`closed`), or else (checked in `_read`) the option's own text ("B blue"). A bare
# letter followed by other words is prose, not a choice: "A red square is shown", "I think B",
# "Answer: C is wrong". Not one of several either ("B or C", "(B) and (C)", "B/C").
_CHOICE = re.compile(r"""
    (?:(?:option|choice|letter)\s*:?\s*)?
    (?: [(\[] (?P<bracketed>[a-z]) [)\]]
      | (?P<bare>[a-z]) (?![a-z0-9'’]) )
    (?![\s,]*(?:and|or|nor)\b|\s*[&/])
    (?P<closed> \s*[.:,;)\]!?] | \s*$ | \s+[-–—](?=\s)                    # "B.", "B)", "B", "B - blue"
              | \s+(?=(?:because|since|which)\b)                          # "B because it is cold"
              | \s+(?=(?:is|would\s+be)\s+(?:the\s+)?(?:correct|right)\b) )? # "B is correct"
    \s*""", re.I | re.X)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")
_CLAUSE_END = re.compile(r"[,;]|\s(?:because|since)\b", re.I)

# The statements of an answer, in order. Each regex marks where the answer states a choice; the
# choice is read (by `_read`) right after the match.
_STATEMENTS: list[tuple[str, re.Pattern[str]]] = [
    # 1. The answer opens with its choice. Bare replies, as LLaVA-1.5 prompts ask for ("Answer with the
    #    option's letter"): "B", "b", "(B)", "B.", "B)", "B: blue", "B. blue", "B blue", "Option B",
    #    "blue" (an option's text: here it must be the whole answer); and answer-first reasoning
    #    ("B. The sky is ...", "B because ...").
    ("opening", re.compile(r"^")),
    # 2. An answer cue, the choice after it: "The answer is B." (LLaVA's ScienceQA targets, and what its
    #    eval_science_qa.py looks for), "ANSWER: B." (its LEPA format), "Answer: (B)", "Final answer: b",
    #    "the correct option is (C)", "The best choice would be B", "The answer is blue".
    ("cue", re.compile(r"\b(?:answer|option|choice)\s*(?:is\b|:|would\s+be\b)\s*:?\s*", re.I)),
    # 3. A verdict after the choice, as chat models conclude: "..., so B is correct", "Option (C) is the
    #    right answer". The match ends where the letter starts; "is correct" rules out the article.
    ("verdict", re.compile(r"(?:\b(?i:option|choice)\s*)?(?=(?:[(\[][A-Za-z][)\]]|\b[A-Z]\b)\s+"
                           r"(?:is|would\s+be)\s+(?:the\s+)?(?:correct|right)\b)")),
]


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
    """The option an answer picks, or None when it names none clearly (never a guess).

    The answer (markdown marks dropped, and cut at a "BECAUSE:" explanation) is searched for
    statements of a choice with the patterns of `_STATEMENTS`: its opening, each answer cue ("The
    answer is", "Answer:", "the correct option is") and each verdict ("B is correct"). A statement
    reads a letter ("B", "(B)", "B.", "B: blue", "option B", lower case too) or an option's text.

    The final stated answer counts: of all the statements, the one that begins last in the text
    wins, so "I first thought A but the answer is C" is C, and a solution that weighs the options
    and ends with "The answer is B." is B. If that final statement names a letter that is not an
    option, or contradicts itself ("B. green" where green is C), the answer is unparsed: an earlier
    statement is not used instead. A cue followed by nothing recognisable ("the answer is not A",
    "the answer is unclear") states nothing and is skipped.
    """
    text = _EXPLANATION.split(_MARKUP.sub("", answer), 1)[0].strip()
    final: tuple[int, str | None] | None = None  # (where it starts, what it names)
    for name, pattern in _STATEMENTS:
        for m in pattern.finditer(text):
            found, letter = _read(text[m.end():], opts, whole=name == "opening")
            if found and (final is None or m.start() >= final[0]):
                final = (m.start(), letter)
    return final[1] if final else None


def _read(span: str, opts: dict[str, str], whole: bool) -> tuple[bool, str | None]:
    """(found, letter): whether `span` opens with a stated choice, and which option it is (None for
    a letter that is not an option or one contradicted by the text after it). An option's text must
    be all of `span` when `whole`, else its first sentence or clause."""
    by_text = {normalize(v): k for k, v in opts.items() if normalize(v)}
    said = [span] if whole else _first_parts(span)
    for part in reversed(said):  # the longer part first: options may hold commas
        if normalize(part) in by_text:
            return True, by_text[normalize(part)]
    m = _CHOICE.match(span)
    if m is None:
        return False, None
    letter = (m["bracketed"] or m["bare"]).upper()
    rest = [normalize(part) for part in _first_parts(span[m.end():])]
    own = normalize(opts.get(letter, ""))
    if not (m["bracketed"] or m["closed"] is not None or (own and own in rest)):  # "B blue"
        return False, None
    if letter not in opts:
        return True, None
    if own not in rest and any(by_text.get(part, letter) != letter for part in rest if part):
        return True, None  # "B. green" where green is C: it contradicts itself
    return True, letter


def _first_parts(span: str) -> list[str]:
    """The first clause and the first sentence (or line) of `span`."""
    sentence = _SENTENCE_END.split(span.strip(), 1)[0].strip()
    return [_CLAUSE_END.split(sentence, 1)[0].strip(), sentence]


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
