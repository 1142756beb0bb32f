"""Tests for zerosearch_jax.rewards (docs/method.md §5)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerosearch_jax.rewards import (
    cover_exact_match,
    exact_match,
    extract_answer,
    f1_score,
    flashrag_f1_score,
    normalize_answer,
    score_response,
)

# The policy prompt of docs/method.md §2 ends with this example answer span.
PROMPT_TAIL = "For example, <answer> Beijing </answer>. Question: who?\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a   cat,\tan apple and THE dog ", "cat apple and dog"),
        ("theory anthem", "theory anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("Wilhelm Conrad Röntgen", "wilhelm conrad röntgen"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_metrics_ignore_articles_and_punctuation():
    assert exact_match("The Beatles.", "beatles") == 1.0
    assert f1_score("the beatles!", ["Beatles"]) == 1.0
    assert cover_exact_match("It was The Beatles, of course", "Beatles") == 1.0


def test_max_over_aliases():
    golds = ["Olivia", "MFSK"]
    assert exact_match("mfsk", golds) == 1.0
    assert exact_match("olivia mfsk", golds) == 0.0
    assert cover_exact_match("olivia mfsk", golds) == 1.0
    assert f1_score("olivia mfsk", golds) == pytest.approx(2 / 3)


def test_f1_partial_overlap():
    # pred {barack, obama, jr} vs gold {barack, obama}: p = 2/3, r = 1 -> F1 = 0.8.
    assert f1_score("Barack Obama Jr", "Barack Obama") == pytest.approx(0.8)
    assert f1_score("Paris", "London") == 0.0
    # Bag of words: repeated tokens count once per gold occurrence.
    assert f1_score("obama obama", "obama") == pytest.approx(2 / 3)


def test_training_f1_has_no_yes_no_rule_as_upstream():
    # Upstream's qa_em.py: plain token F1 on yes / no answers.
    assert f1_score("yes it is", "yes") == pytest.approx(0.5)
    assert f1_score("yes no", "no") == pytest.approx(2 / 3)
    assert f1_score("no", "no way") == pytest.approx(2 / 3)
    assert f1_score("yes", "Yes.") == 1.0
    assert score_response("<answer> yes it is </answer>", ["yes"])["f1"] == pytest.approx(0.5)


def test_flashrag_f1_keeps_the_yes_no_rule_for_evaluation():
    assert flashrag_f1_score("yes it is", "yes") == 0.0
    assert flashrag_f1_score("yes no", "no") == 0.0  # no partial credit against "no"
    assert flashrag_f1_score("no", "no way") == 0.0
    assert flashrag_f1_score("yes", "Yes.") == 1.0
    assert flashrag_f1_score("not yes", "maybe not") == 0.5  # only the exact words
    assert score_response("<answer> yes it is </answer>", ["yes"], flashrag_f1=True)["f1"] == 0.0


def test_no_answer_scores_zero():
    for metric in (f1_score, exact_match, cover_exact_match):
        assert metric(None, "Beijing") == 0.0
        assert metric("Beijing", []) == 0.0
    assert score_response("I think it is Beijing.", "Beijing") == {
        "answer": None,
        "f1": 0.0,
        "em": 0.0,
        "cover_em": 0.0,
    }


def test_empty_gold_matches_nothing():
    # Upstream's substring test would give cover EM 1 to any prediction for gold "The".
    assert cover_exact_match("anything", "The") == 0.0
    assert exact_match("a", "the") == 0.0


def test_answer_in_prompt_is_not_counted():
    response = "<think> unsure </think> I cannot find it."
    assert extract_answer(response) is None
    assert score_response(response, ["Beijing"])["f1"] == 0.0
    # Upstream extracted from prompt + response and would have read the prompt's example:
    assert extract_answer(PROMPT_TAIL + response) == "Beijing"


def test_last_complete_span_wins():
    assert extract_answer("<answer> Paris </answer> hmm <answer>London</answer>") == "London"
    assert extract_answer("<answer>Paris</answer> then <answer> London") == "Paris"
    assert extract_answer("<answer> a <answer> b </answer>") == "b"
    assert extract_answer("<answer>\n multi\nline \n</answer>") == "multi\nline"
    assert extract_answer("<answer></answer>") == ""


def test_unclosed_or_reversed_tags_ignored():
    assert extract_answer("<answer> Paris") is None
    assert extract_answer("Paris </answer>") is None
    assert extract_answer("</answer> Paris <answer>") is None


def test_score_response():
    scores = score_response("<think>x</think> <answer> The Eiffel Tower </answer>", "Eiffel Tower")
    assert scores == {"answer": "The Eiffel Tower", "f1": 1.0, "em": 1.0, "cover_em": 1.0}
    scores = score_response("<answer>Eiffel Tower in Paris</answer>", ("Eiffel Tower",))
    assert scores["em"] == 0.0 and scores["cover_em"] == 1.0
    assert scores["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_cover_em_is_a_substring_test():
    # Upstream semantics (paper tables): a character substring, not a token match.
    assert cover_exact_match("concatenate", "cat") == 1.0
    assert f1_score("concatenate", "cat") == 0.0


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

_texts = st.text(st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["yes", "no", "noanswer", "The", "a b", "Paris", "<answer>", "</answer>", ""]
)
_golds = _texts | st.lists(_texts, max_size=4)


@given(st.text(max_size=200))
def test_extract_never_crashes(text):
    answer = extract_answer(text)
    assert answer is None or (answer == answer.strip() and "</answer>" not in answer)


@given(st.lists(_texts, max_size=6).map(lambda parts: "<answer>".join(parts)), _golds)
def test_score_response_never_crashes(response, golds):
    scores = score_response(response + "</answer>", golds)
    assert set(scores) == {"answer", "f1", "em", "cover_em"}


@given(_texts, _golds)
def test_metrics_in_unit_interval(prediction, golds):
    for metric in (f1_score, exact_match, cover_exact_match):
        assert 0.0 <= metric(prediction, golds) <= 1.0


@given(_texts, _texts)
def test_f1_symmetric_for_single_strings(a, b):
    assert f1_score(a, b) == pytest.approx(f1_score(b, a))


@given(_texts, _golds)
def test_em_implies_cover_em_and_positive_f1(prediction, golds):
    if exact_match(prediction, golds) == 1.0:
        assert cover_exact_match(prediction, golds) == 1.0
        assert f1_score(prediction, golds) == 1.0


@given(_texts)
def test_prediction_matches_itself(text):
    if normalize_answer(text):
        assert exact_match(text, text) == 1.0
        assert cover_exact_match(text, [text]) == 1.0
        assert f1_score(text, text) == 1.0
    else:
        assert exact_match(text, text) == 0.0  # empty gold matches nothing
