"""Evaluation metrics against hand-computed numbers."""

from __future__ import annotations

from math import comb

import pytest

from rlpost.tracking.eval_metrics import (
    aggregate,
    format_table,
    maj_at_k,
    mean_at_k,
    pass_at_k,
    problem_metrics,
)


@pytest.mark.parametrize(("k", "expected"), [(1, 0.4), (2, 0.7), (3, 0.9), (4, 1.0), (5, 1.0)])
def test_pass_at_k_n5_c2_by_hand(k, expected):
    # 1 - C(3,k)/C(5,k): 1 - 3/5, 1 - 3/10, 1 - 1/10, 1 - 0/5, 1 - 0/1
    assert pass_at_k(5, 2, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_no_correct_and_all_correct():
    assert [pass_at_k(5, 0, k) for k in range(1, 6)] == [0.0] * 5
    assert [pass_at_k(5, 5, k) for k in range(1, 6)] == [1.0] * 5
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0


def test_pass_at_k_matches_binomials_and_stays_finite_for_large_n():
    for n, c, k in [(10, 3, 4), (16, 1, 8), (64, 20, 16)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12)
    assert pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000, rel=1e-9)  # C(2000, 1000) overflows a float
    assert 0.0 < pass_at_k(2000, 3, 1000) < 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (0, 0, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_at_k_is_c_over_n_for_every_k():
    assert [mean_at_k(5, 2, k) for k in range(1, 6)] == [0.4] * 5
    assert mean_at_k(4, 3) == 0.75
    with pytest.raises(ValueError):
        mean_at_k(4, 3, 5)


def test_maj_at_k_first_k_ties_and_nones():
    answers = ["3", None, "4", "4", "3", None, "5"]
    correct = [True, False, False, False, True, False, False]
    # k=1,2: {3:1}; k=3: {3:1, 4:1} tie -> 3 (seen first); k=4: {3:1, 4:2} -> 4 (wrong);
    # k=5,6: {3:2, 4:2} tie -> 3; k=7: {3:2, 4:2, 5:1} -> 3
    got = [maj_at_k(answers, correct, k) for k in range(1, 8)]
    assert got == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def test_maj_at_k_nones_never_win():
    answers, correct = [None, None, "7"], [False, False, True]
    assert maj_at_k(answers, correct, 2) == 0.0  # nothing extracted among the first 2
    assert maj_at_k(answers, correct, 3) == 1.0  # two Nones still lose to one "7"
    with pytest.raises(ValueError):
        maj_at_k(answers, correct[:2], 2)
    with pytest.raises(ValueError):
        maj_at_k(answers, correct, 4)


def _two_problems():
    first = problem_metrics(
        [True, False, False, True], ["6", "5", "5", "6"], [1, 2, 3], greedy=True, truncated=[0, 0, 1, 0]
    )
    second = problem_metrics(
        [False] * 4, [None, "1", "2", "2"], [3, 1, 2, 2], greedy=False, truncated=[1, 0, 0, 0]
    )
    return first, second


def test_problem_metrics_by_hand():
    first, second = _two_problems()
    # n=4, c=2: pass@2 = 1 - C(2,2)/C(4,2) = 5/6; pass@3 = 1 (only 2 wrong samples);
    # maj@2: 6 and 5 tie -> 6 (correct); maj@3: 5 twice -> wrong
    assert first == pytest.approx(
        {
            "greedy": 1.0,
            "mean@4": 0.5,
            "pass@1": 0.5,
            "pass@2": 5 / 6,
            "pass@3": 1.0,
            "maj@1": 1.0,
            "maj@2": 1.0,
            "maj@3": 0.0,
            "truncated": 0.25,
        }
    )
    assert list(first) == [
        "greedy",
        "mean@4",
        "pass@1",
        "pass@2",
        "pass@3",
        "maj@1",
        "maj@2",
        "maj@3",
        "truncated",
    ]
    assert second == {**dict.fromkeys(first, 0.0), "truncated": 0.25}
    assert problem_metrics([True], ["1"], [1]) == {"mean@1": 1.0, "pass@1": 1.0, "maj@1": 1.0}


def test_aggregate_means_and_count():
    first, second = _two_problems()
    assert aggregate([first, second]) == pytest.approx(
        {
            "greedy": 0.5,
            "mean@4": 0.25,
            "pass@1": 0.25,
            "pass@2": 5 / 12,
            "pass@3": 0.5,
            "maj@1": 0.5,
            "maj@2": 0.5,
            "maj@3": 0.0,
            "truncated": 0.25,
            "problems": 2,
        }
    )
    assert aggregate([]) == {"problems": 0}
    with pytest.raises(ValueError, match="different metrics"):
        aggregate([first, problem_metrics([True, True], ["1", "1"], [1, 2])])


def test_format_table_exact_text():
    rows = {
        ("test", "gsm_symbolic"): {
            "truncated": 0.125,
            "maj@4": 0.5,
            "pass@4": 0.75,
            "problems": 2,
            "pass@1": 0.25,
            "mean@4": 0.25,
            "greedy": 0.5,
        },
        ("train", "all"): {
            "greedy": 1.0,
            "mean@4": 0.8,
            "pass@1": 0.8,
            "pass@4": 1.0,
            "maj@4": 1.0,
            "problems": 12,
            "truncated": 0.0,
        },
        ("test", "x"): {"pass@1": 0.0, "problems": 0},
    }
    assert format_table(rows).splitlines() == [
        "eval set  source        greedy  mean@4  pass@1  pass@4  maj@4  problems  truncated",
        "--------  ------------  ------  ------  ------  ------  -----  --------  ---------",
        "test      gsm_symbolic   0.500   0.250   0.250   0.750  0.500         2      0.125",
        "train     all            1.000   0.800   0.800   1.000  1.000        12      0.000",
        "test      x                  -       -   0.000       -      -         0          -",
    ]
    assert format_table({("a", "b"): {"pass@1": 0.123}}, digits=1).splitlines() == [
        "eval set  source  pass@1",
        "--------  ------  ------",
        "a         b          0.1",
    ]
