"""avg@n, unbiased pass@k (product form), cons@n majority vote and the benchmark summary."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from async_rl.evaluation.metrics import (
    ProblemResult,
    SampleResult,
    default_ks,
    majority_vote,
    pass_at_k,
    pass_at_k_binomial,
    summarize,
    vote_key,
)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(10, 3, 1, 0.3), (10, 3, 5, 0.916667), (64, 10, 8, 0.764928), (8, 0, 4, 0.0), (5, 1, 5, 1.0)],
)
def test_pass_at_k_matches_the_checked_values_of_algorithms_section_4(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=5e-7)


@given(st.integers(1, 80).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_product_form_equals_the_binomial_form(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_binomial(n, c, k), abs=1e-12)


def test_pass_at_k_is_exact_and_finite_where_binomials_overflow_floats():
    # C(1024, 512) ≈ 4e306: the product form never forms it.
    value = pass_at_k(1024, 1, 512)
    assert value == pytest.approx(0.5) and math.isfinite(value)


def test_pass_at_1_is_the_fraction_correct_and_pass_at_n_is_any_correct():
    assert pass_at_k(64, 16, 1) == pytest.approx(0.25)
    assert pass_at_k(64, 1, 64) == 1.0 and pass_at_k(64, 0, 64) == 0.0


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="need 0 <= c <= n"):
        pass_at_k(n, c, k)


def test_majority_vote_scores_the_most_frequent_answer():
    vote = majority_vote(["12", "7", "12", None, "12", "7"], [True, False, True, False, True, False])
    assert (vote.answer, vote.votes, vote.tied, vote.credit) == ("12", 3, 1, 1.0)
    wrong = majority_vote(["7", "7", "12"], [False, False, True])
    assert (wrong.answer, wrong.credit) == ("7", 0.0)


def test_a_tie_scores_the_fraction_of_tied_answers_that_are_correct():
    two_way = majority_vote(["3", "5", "5", "3", "9"], [True, False, False, True, False])
    assert (two_way.tied, two_way.votes, two_way.credit) == (2, 2, 0.5)
    three_way = majority_vote(["a", "b", "c"], [False, True, True])
    assert three_way.credit == pytest.approx(2 / 3)
    both_right = majority_vote(["1/2", "0.5"], [True, True])  # equivalent forms, both verified
    assert both_right.credit == 1.0


def test_a_tie_does_not_depend_on_sample_order():
    answers, verdicts = ["3", "5", "5", "3"], [True, False, False, True]
    forward = majority_vote(answers, verdicts)
    backward = majority_vote(answers[::-1], verdicts[::-1])
    assert forward.credit == backward.credit == 0.5


def test_answers_that_differ_only_in_spacing_or_dollars_vote_together():
    assert vote_key(" \\frac{1}{2} ") == vote_key("$\\frac {1}{2}$.") == "\\frac{1}{2}"
    vote = majority_vote(["\\left(1,2\\right)", "(1, 2)", "7"], [True, True, False])
    assert (vote.votes, vote.credit) == (2, 1.0)


def test_no_extracted_answer_anywhere_scores_zero():
    vote = majority_vote([None, None, ""], [False, False, False])
    assert (vote.answer, vote.credit) == (None, 0.0)


def test_default_ks_are_powers_of_four_up_to_n_and_n():
    assert default_ks(64) == [1, 4, 16, 64]
    assert default_ks(8) == [1, 4, 8]
    assert default_ks(1) == [1]


def sample(correct: bool, parsed: str | None, tokens: int = 10, finish: str = "stop") -> SampleResult:
    return SampleResult(tokens, finish, "correct" if correct else "wrong", parsed, correct)


def test_summary_averages_per_problem_rates_over_problems():
    easy = ProblemResult("b:0", "4", [sample(True, "4"), sample(True, "4"), sample(True, "4"), sample(False, "5")])
    hard = ProblemResult("b:1", "9", [sample(False, "1", 30, "length"), sample(False, "2"),
                                      sample(True, "9"), sample(False, None, 50, "length")])
    summary = summarize([easy, hard], ks=[1, 2, 4])
    assert summary["avg@n"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert summary["pass@k"]["2"] == pytest.approx((1.0 + (1 - 3 / 6)) / 2)  # 1 − C(3,2)/C(4,2)
    assert summary["pass@k"]["4"] == 1.0
    assert summary["cons@n"] == pytest.approx((1.0 + 1 / 3) / 2)  # hard: three single votes tie
    assert summary["mean_response_tokens"] == pytest.approx((6 * 10 + 30 + 50) / 8)
    assert summary["truncated_fraction"] == pytest.approx(2 / 8)
    assert summary["no_answer_fraction"] == pytest.approx(1 / 8)
    assert [row["correct"] for row in summary["per_problem"]] == [3, 1]
    assert summary["per_problem"][1]["statuses"] == {"wrong": 3, "correct": 1}


def test_code_benchmarks_report_no_majority_vote():
    programs = ProblemResult("lcb:0", "[tests]", [sample(True, "print(1)"), sample(False, "print(2)")])
    summary = summarize([programs], ks=[1], vote=False)
    assert summary["cons@n"] is None and summary["per_problem"][0]["cons"] is None
    assert summary["per_problem"][0]["majority_answer"] is None and summary["avg@n"] == 0.5
