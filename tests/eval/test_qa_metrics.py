"""Exact match and token F1 with SQuAD normalisation, on hand-made answers."""

import pytest

from moetune.eval.qa_metrics import (
    aggregate_scores,
    clean_prediction,
    exact_match,
    gold_answers,
    normalize_answer,
    token_f1,
)


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The Refund, for AN order!  ") == "refund for order"
    assert normalize_answer("theme a-b") == "theme ab"  # "the" only as a word; hyphens are punctuation


def test_exact_match_compares_normalised_answers_against_every_gold():
    assert exact_match("The refund.", ["refund"]) == 1.0
    assert exact_match("refunds", ["refund"]) == 0.0
    assert exact_match("capture", ["refund", "Capture!"]) == 1.0


def test_token_f1_values():
    # 2 common tokens; precision 2/3, recall 1 -> F1 0.8
    assert token_f1("capture the payment now", ["capture payment"]) == pytest.approx(0.8)
    # repeated tokens count as a multiset: common = min(2, 2) "y" -> precision 2/3, recall 2/3
    assert token_f1("x y y", ["y y z"]) == pytest.approx(2 / 3)
    assert token_f1("refund", ["capture payment"]) == 0.0
    assert token_f1("capture payment", ["refund", "capture payment"]) == 1.0  # best gold wins
    assert token_f1("", ["refund"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both normalise to nothing: they agree


def test_scores_aggregate_per_label_and_overall():
    overall, per_label = aggregate_scores([("payments", 1.0, 1.0), ("payments", 0.0, 0.5), ("refunds", 1.0, 1.0)])
    assert (overall.exact_match, overall.f1, overall.count) == (pytest.approx(2 / 3), pytest.approx(2.5 / 3), 3)
    assert list(per_label) == ["payments", "refunds"]
    assert (per_label["payments"].exact_match, per_label["payments"].f1, per_label["payments"].count) == (0.5, 0.75, 2)
    assert per_label["refunds"].as_dict() == {"exact_match": 1.0, "f1": 1.0, "count": 1}


def test_prediction_is_cut_at_the_first_line_unless_an_answer_spans_lines():
    assert clean_prediction(" Refund it.\nQuestion: what next?", ["refund it"]) == "Refund it."
    assert clean_prediction("line one\nline two\n", ["a\nb"]) == "line one\nline two"


def test_gold_answers_come_from_answers_or_the_completion():
    assert gold_answers({"completion": " refund it "}) == ["refund it"]
    assert gold_answers({"completion": " a, b", "answers": ["a", " b "]}) == ["a", "b"]
