"""Scores per question type: records name their `category`; each type's score is logged as `score/<category>`."""

import pytest

from tracking.metrics import UnknownMetric, category_metric, spec
from trainables.evaluate import Scores


def test_the_types_split_the_questions_and_their_hits():
    s = Scores(10, 5, 0, 0, (("", 1, 1), ("color", 2, 4), ("count", 2, 5)))
    by = s.by_category()
    assert {k: (v.hits, v.questions) for k, v in by.items()} == {"uncategorized": (1, 1), "color": (2, 4),
                                                                   "count": (2, 5)}
    assert by["color"].score == 50.0 and by["color"].interval.low < 50.0 < by["color"].interval.high


def test_a_type_named_uncategorized_joins_the_questions_that_name_none():
    by = Scores(6, 3, 0, 0, (("", 1, 2), ("color", 1, 2), ("uncategorized", 1, 2))).by_category()
    assert {k: (v.hits, v.questions) for k, v in by.items()} == {"uncategorized": (2, 4), "color": (1, 2)}


def test_one_type_or_none_is_not_broken_down():
    assert Scores(4, 2, 0, 0, (("color", 2, 4),)).by_category() == {}
    assert Scores(4, 2, 0, 0).by_category() == {}


def test_a_type_becomes_a_metric_mlflow_takes_and_its_spec_follows_its_score():
    from mlflow.utils.validation import _validate_metric_name

    assert category_metric("score", "color") == "score/color"
    assert category_metric("score_n", "what's this?") == "score_n/what_s this_"
    for odd in ("what's this?", "a/../b", "ü", "x.y", "tab\there"):
        _validate_metric_name(category_metric("score_ci_low", odd))  # raises on a name MLflow would refuse
    m = spec("score_ci_low/count")
    assert m.unit == "0-100" and "type 'count' only" in m.description and spec("score_ci_low").description in m.description
    assert spec("text_score_n/chat").unit == "questions" and spec("score/a_n").unit == "0-100"
    for bad in ("score/", "gpu_hours/color", "scroe/color"):
        with pytest.raises(UnknownMetric):
            spec(bad)


def test_what_a_trial_logs_per_type_merges_names_mlflow_spells_alike_and_stops_at_many_types():
    from trainables.evaluate import MAX_CATEGORIES

    s = Scores(12, 7, 0, 0, (("a?", 1, 2), ("a!", 2, 3), ("a_n", 1, 2), ("b", 3, 5)))
    m = s.metrics("score")
    assert set(m) == {f"score{part}{category}" for part in ("", "_n", "_ci_low", "_ci_high")
                      for category in ("", "/a_", "/a_n", "/b")}  # a type named a_n is no count of a type a
    assert (m["score/a_"], m["score_n/a_"], m["score_n/a_n"]) == (60.0, 5, 2) and m["score"] == 7 / 12 * 100
    many = Scores(MAX_CATEGORIES + 1, 0, 0, 0, tuple((f"t{i}", 0, 1) for i in range(MAX_CATEGORIES + 1)))
    assert set(many.metrics("score")) == {"score", "score_n", "score_ci_low", "score_ci_high"}
    assert len(Scores(MAX_CATEGORIES, 0, 0, 0, tuple((f"t{i}", 0, 1) for i in range(MAX_CATEGORIES)))
               .metrics("text_score")) == 4 * (MAX_CATEGORIES + 1)
