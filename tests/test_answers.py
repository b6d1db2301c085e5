"""Answers parsed as benchmarks write them: option letters from predictions and references alike,
the final stated answer, never a guess; normalized exact match for everything else."""

import pytest

from trainables.answers import choice_letter, exact_match, judge, normalize, options

QUESTION = "What color is the square?\nA. red\nB. blue\nC. green\nD. the dark purple\nAnswer with the option's letter."
OPTS = {"A": "red", "B": "blue", "C": "green", "D": "the dark purple"}
# A question as LLaVA's ScienceQA conversion writes it (QCM: question, context, inline options).
SQA_QUESTION = ("<image>\nWhich property do these three objects have in common?\nContext: Select the best answer.\n"
                "Options: (A) soft (B) sticky (C) yellow")
SQA_OPTS = {"A": "soft", "B": "sticky", "C": "yellow"}
# Its LLaVA targets: reasoning first (LECTURE/SOLUTION, answer last) and answer first (BECAUSE after it).
SQA_LEA = ("LECTURE: An object has different properties. A property of an object can tell you how it looks, "
           "feels, tastes, or smells.\nSOLUTION: Look at each object. For each object, decide if it has that "
           "property. A sticky object can attach to other things. The honey is not sticky. Yellow is a color. "
           "The pillow is not yellow. The property that all three objects have in common is soft.\n"
           "The answer is A.")
SQA_LEPA = SQA_LEA.replace("The answer is A.", "###\nANSWER: A.")
SQA_ANSWER_FIRST = ("The answer is A. BECAUSE: A soft object changes shape when pressed. If they were all "
                    "yellow, the answer would be C.")


def test_normalize():
    assert normalize("  The Red.") == "red"
    assert normalize("top  left!") == "top left"
    assert exact_match("A circle", "circle")
    assert not exact_match("circles", "circle")
    assert not exact_match("", "red")


@pytest.mark.parametrize("question, expected", [
    (QUESTION, OPTS),
    ("<image>\nWhich one?\n(A) red\n(B) blue", {"A": "red", "B": "blue"}),
    ("Which one?\nA: red\nB: blue\nC: green", {"A": "red", "B": "blue", "C": "green"}),
    ("Which one?\nA) red\nB) blue", {"A": "red", "B": "blue"}),
    ("Which one?\nA. red\n(B) blue\nC: green\nD) pink", {"A": "red", "B": "blue", "C": "green", "D": "pink"}),
    ("Context: none\nQuestion: which?\nOptions: (A) red (B) blue (C) green", {"A": "red", "B": "blue", "C": "green"}),
    (SQA_QUESTION, SQA_OPTS),
    # the last list counts
    ("A. one\nB. two\nNow choose:\nA. red\nB. blue", {"A": "red", "B": "blue"}),
    # not lists of choices: a single lettered line, letters out of order, or no options at all
    ("A. Lincoln was a president. Who followed him?", {}),
    ("Which?\nA. red\nC. green", {}),
    ("B. red\nC. blue", {}),
    ("Options: (A) red", {}),
    ("Options: (B) red (C) blue", {}),
    ("What color is the circle?", {}),
    ("", {}),
])
def test_options_are_found_only_where_a_question_lists_them(question, expected):
    assert options(question) == expected


# The formats a letter is read from, in predictions and references alike (opts: OPTS unless given).
@pytest.mark.parametrize("answer, letter", [
    # bare replies, as "Answer with the option's letter" asks
    ("B", "B"), ("b", "B"), (" B \n", "B"), ("(B)", "B"), ("(b)", "B"), ("[B]", "B"), ("B.", "B"), ("B)", "B"),
    ("B:", "B"), ("B,", "B"), ("A", "A"), ("a", "A"),
    # a letter and its option's text, or the text alone
    ("B: blue", "B"), ("B. blue", "B"), ("(B) blue", "B"), ("B blue", "B"), ("b blue", "B"), ("B - blue", "B"),
    ("B. bl", "B"),  # cut off by max_new_tokens: the letter still says it
    ("blue", "B"), ("Blue.", "B"), ("the dark purple", "D"), ("dark purple", "D"),
    ("A blue", "B"),  # "a blue (one)": the article, then B's text
    # "Option B" and answer cues
    ("Option B", "B"), ("option (b)", "B"), ("Choice B: blue", "B"),
    ("The answer is B", "B"), ("The answer is B.", "B"), ("the answer is b", "B"), ("The answer is: (B)", "B"),
    ("ANSWER: B", "B"), ("Answer: (B)", "B"), ("answer: B. blue", "B"), ("Final answer: b.", "B"),
    ("The correct option is C", "C"), ("the correct option is (C)", "C"), ("The best choice would be D.", "D"),
    ("The answer is blue", "B"), ("The answer is the dark purple.", "D"),
    ("Therefore, the final answer is: (D) the dark purple", "D"),
    ("The answer is B because the square is cold.", "B"), ("The answer is B, not C.", "B"),
    ("the answer is a because it is warm", "A"),
    ("The answer is blue, because the square is cold.", "B"), ("The answer is blue since it is cold.", "B"),
    ("Answer: The answer is C.", "C"),
    # markdown
    ("**B**", "B"), ("**B. blue**", "B"), ("**Answer:** B", "B"), ("The answer is **(C) green**.", "C"),
    # verdicts
    ("B is correct.", "B"), ("Option (C) is the right answer.", "C"), ("A is correct", "A"),
    ("Red is warm and blue is cool, so B is correct.", "B"),
    # answer-first reasoning
    ("B. The square is painted in a cool color.", "B"), ("B because the square is cold.", "B"),
    # the final stated answer
    ("I first thought A but the answer is C", "C"),
    ("The answer is A. Wait, no: B is correct.", "B"),
    ("Option A is red and option C is green, neither fits. The answer is B.", "B"),
    ("A. Hmm, on a second look the answer is D.", "D"),
    ("If the answer is red, then it is warm; so the answer is C.", "C"),
    # LLaVA's ScienceQA targets, as predictions or references
    (SQA_LEA, "A"), (SQA_LEPA, "A"), (SQA_ANSWER_FIRST, "A"),
])
def test_choice_letter_reads_benchmark_formats(answer, letter):
    opts = SQA_OPTS if answer in (SQA_LEA, SQA_LEPA, SQA_ANSWER_FIRST) else OPTS
    assert choice_letter(answer, opts) == letter


@pytest.mark.parametrize("answer", [
    "", "I don't know", "E", "(E)", "The answer is E", "bluish", "blue or green", "I think B",
    "B. green",                 # contradicts itself: green is C
    "The answer is (B) green.",  # the same, after a cue
    "The answer is B. green, a cool color.",
    "A cat",                    # an article, not option A
    "A red square is shown.", "Answer: A red square is shown.", "the answer is a red one",
    "Blueberry", "It is the second one", "B C", "BC", "I'd go with b",
    "Red. No, wait: blue.",  # an option's text alone must be the whole answer
    "the answer is b and c", "The answer is B or C.", "The answer is (B) and (C).", "Answer: B/C", "B, or C",
    # a letter followed by prose is talked about, not chosen
    "answer: b is a cool color", "Option A is wrong.", "Answer: C is wrong.", "B is not correct.",
    "Options B and C look alike.", "The answer is either B or C.", "The answer is not A.",
    "B. No wait, the answer is E.",  # the final statement names no option: B is not used instead
    "**Answer:** F",
])
def test_unparsable_answers_are_never_guessed(answer):
    assert choice_letter(answer, OPTS) is None


def test_the_explanation_after_because_states_no_answer():
    # without the cut at BECAUSE:, "the answer would be C" would be the final stated answer
    assert choice_letter(SQA_ANSWER_FIRST.split(" BECAUSE:")[1], SQA_OPTS) == "C"
    assert choice_letter(SQA_ANSWER_FIRST, SQA_OPTS) == "A"


def test_a_letter_must_be_one_of_the_options():
    assert choice_letter("The answer is D.", SQA_OPTS) is None
    assert choice_letter("The answer is D.", OPTS) == "D"
    assert choice_letter("B", {}) is None


def test_multiple_choice_scores_letters_and_counts_unparsed_answers():
    assert judge("B", "B", QUESTION) == (True, "choice")
    assert judge("The answer is B.", "B. blue", QUESTION) == (True, "choice")
    assert judge("blue", "B", QUESTION) == (True, "choice")
    assert judge("**B**", "The answer is B.", QUESTION) == (True, "choice")
    assert judge("C", "B", QUESTION) == (False, "choice")
    assert judge("(C) green", "The answer is B.", QUESTION) == (False, "choice")
    assert judge("no idea", "B", QUESTION) == (False, "unparsed")
    assert judge("", "B", QUESTION) == (False, "unparsed")
    assert judge("B. green", "B", QUESTION) == (False, "unparsed")
    assert judge("The answer is E.", "B", QUESTION) == (False, "unparsed")


def test_llava_scienceqa_targets_score_as_references():
    assert judge("A", SQA_LEA, SQA_QUESTION) == (True, "choice")
    assert judge("The answer is A.", SQA_LEPA, SQA_QUESTION) == (True, "choice")
    assert judge(SQA_ANSWER_FIRST, SQA_LEA, SQA_QUESTION) == (True, "choice")
    assert judge("(C) yellow", SQA_ANSWER_FIRST, SQA_QUESTION) == (False, "choice")
    assert judge("soft", SQA_LEA, SQA_QUESTION) == (True, "choice")
    assert judge("It is soft, I guess", SQA_LEA, SQA_QUESTION) == (False, "unparsed")


def test_exact_match_is_unchanged_for_short_answers():
    # a question without lettered options keeps normalized exact match, even when the answer is a letter
    assert judge("The red.", "red", "What color is the circle?") == (True, "exact")
    assert judge("B", "red", "What color is the circle?") == (False, "exact")
    assert judge("A", "a", "Which letter comes first?") == (True, "exact")
    assert judge("The answer is B.", "B", "Which letter comes second?") == (False, "exact")


def test_options_whose_reference_names_none_of_them_fall_back_to_exact_match():
    assert judge("yellow", "yellow", QUESTION) == (True, "exact")
    assert judge("Yellow.", "yellow", QUESTION) == (True, "exact")
    assert judge("B", "yellow", QUESTION) == (False, "exact")
    assert judge("yellow", "B. green", QUESTION) == (False, "exact")  # a reference that contradicts itself
