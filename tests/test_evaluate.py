"""Answer scoring: normalized exact match for short answers, option letters for multiple choice."""

import pytest

from trainables.evaluate import choice_letter, exact_match, judge, normalize, options, question_texts


def test_normalize():
    assert normalize("  The Red.") == "red"
    assert normalize("top  left!") == "top left"
    assert exact_match("A circle", "circle")
    assert not exact_match("circles", "circle")
    assert not exact_match("", "red")


def test_exact_match_is_unchanged_for_short_answers():
    # a question without lettered options keeps normalized exact match, even when the answer is a letter
    assert judge("The red.", "red", "What color is the circle?") == (True, "exact")
    assert judge("B", "red", "What color is the circle?") == (False, "exact")
    assert judge("A", "a", "Which letter comes first?") == (True, "exact")


QUESTION = "What color is the square?\nA. red\nB. blue\nC. green\nD. the dark purple\nAnswer with the option's letter."
OPTS = {"A": "red", "B": "blue", "C": "green", "D": "the dark purple"}


@pytest.mark.parametrize("question, expected", [
    (QUESTION, OPTS),
    ("<image>\nWhich one?\n(A) red\n(B) blue", {"A": "red", "B": "blue"}),
    ("Which one?\nA: red\nB: blue\nC: green", {"A": "red", "B": "blue", "C": "green"}),
    ("Which one?\nA) red\nB) blue", {"A": "red", "B": "blue"}),
    ("Context: none\nQuestion: which?\nOptions: (A) red (B) blue (C) green", {"A": "red", "B": "blue", "C": "green"}),
    # the last list counts
    ("A. one\nB. two\nNow choose:\nA. red\nB. blue", {"A": "red", "B": "blue"}),
    # not lists of choices: a single lettered line, letters out of order, or no options at all
    ("A. Lincoln was a president. Who followed him?", {}),
    ("Which?\nA. red\nC. green", {}),
    ("B. red\nC. blue", {}),
    ("What color is the circle?", {}),
    ("", {}),
])
def test_options_are_found_only_where_a_question_lists_them(question, expected):
    assert options(question) == expected


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("B:", "B"), ("B,", "B"), (" B \n", "B"),
    ("B. blue", "B"), ("(B) blue", "B"), ("B: blue", "B"), ("B blue", "B"),
    ("B. bl", "B"),  # cut off by max_new_tokens: the letter still says it
    ("The answer is B", "B"), ("The answer is B.", "B"), ("Answer: (B)", "B"), ("answer: B. blue", "B"),
    ("The correct option is C", "C"), ("The answer is blue", "B"),
    ("blue", "B"), ("Blue.", "B"), ("the dark purple", "D"), ("dark purple", "D"), ("A", "A"), ("a", "A"),
])
def test_choice_letter_parses_common_answer_forms(answer, letter):
    assert choice_letter(answer, OPTS) == letter


@pytest.mark.parametrize("answer", [
    "", "I don't know", "E", "(E)", "The answer is E", "bluish", "blue or green", "I think B",
    "B. green",      # contradicts itself: green is C
    "A cat",         # an article, not option A
    "Blueberry", "It is the second one", "B C", "BC",
])
def test_unparsable_answers_are_never_guessed(answer):
    assert choice_letter(answer, OPTS) is None


def test_multiple_choice_scores_letters_and_counts_unparsed_answers():
    assert judge("B", "B", QUESTION) == (True, "choice")
    assert judge("The answer is B.", "B. blue", QUESTION) == (True, "choice")
    assert judge("blue", "B", QUESTION) == (True, "choice")
    assert judge("C", "B", QUESTION) == (False, "choice")
    assert judge("no idea", "B", QUESTION) == (False, "unparsed")
    assert judge("", "B", QUESTION) == (False, "unparsed")
    # options listed, but the reference names none of them: scored as a short answer
    assert judge("yellow", "yellow", QUESTION) == (True, "exact")


def test_question_texts_are_the_last_human_turns():
    recs = [{"id": 7, "conversations": [{"from": "human", "value": "<image>\nfirst"}, {"from": "gpt", "value": "x"},
                                        {"from": "human", "value": QUESTION}, {"from": "gpt", "value": "B"}]}]
    assert question_texts(recs) == {"7": QUESTION}
