"""Every metric on hand-made cases."""

from __future__ import annotations

import math

import pytest

from cepe.evaluation.metrics import (
    accuracy,
    clean_answer,
    exact_match,
    f1_score,
    first_integer,
    normalize_answer,
    perplexity,
    substring_match,
)


def test_perplexity():
    assert perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    assert perplexity(0.0, 5) == 1.0
    assert math.isnan(perplexity(1.0, 0))


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("A cat, an owl and THE dog.") == "cat owl and dog"


def test_exact_match():
    assert exact_match("the Beatles.", ["Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    assert exact_match("Paris", ["London", "paris"]) == 1.0
    assert exact_match("", ["x"]) == 0.0


def test_f1_score():
    # pred {barack, obama, jr}, gold {barack, obama}: P = 2/3, R = 1 -> F1 = 0.8
    assert f1_score("Barack Obama Jr", ["barack obama"]) == pytest.approx(0.8)
    assert f1_score("no overlap", ["something else"]) == 0.0
    assert f1_score("John", ["Paul", "John"]) == 1.0  # best over answers
    assert f1_score("obama obama", ["obama"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts clip
    assert f1_score("the", ["a"]) == 1.0  # both normalise to empty


def test_substring_match():
    assert substring_match("It was Max von Sydow, I think.", ["Max von Sydow"]) == 1.0
    assert substring_match("Maxwell", ["Max"]) == 0.0  # whole words only
    assert substring_match("nothing", ["", "x"]) == 0.0


def test_accuracy_and_first_integer():
    assert accuracy(["a", "b", "c"], ["a", "x", "c"]) == pytest.approx(2 / 3)
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError):
        accuracy(["a"], [])
    assert first_integer(" 71432. Remember") == "71432"
    assert first_integer("no digits") is None


def test_clean_answer():
    assert clean_answer(" The answer is:\nMax von Sydow\nmore") == "Max von Sydow"
    assert clean_answer("The answer to this question is: Ben .") == "Ben ."
    assert clean_answer("Answer: Paris") == "Paris"
    assert clean_answer("Jess Walton (born 1949) is") == "Jess Walton (born 1949) is"
    assert clean_answer("The answer is:") == "" and clean_answer("") == ""
    assert exact_match(clean_answer("The answer is: the Beatles."), ["Beatles"]) == 1.0
