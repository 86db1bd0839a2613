"""Response length split by outcome, and the within-group sign-length gap."""

import pytest
import torch

from rlpost.jobs.rl import length_by_correctness


def test_lengths_of_correct_and_incorrect_and_their_gap_within_groups():
    lengths = torch.tensor([[10.0, 20.0, 30.0, 40.0], [5.0, 7.0, 9.0, 11.0], [3.0, 3.0, 3.0, 3.0]])
    correct = [True, False, True, False, False, True, True, True, True, True, True, True]
    out = length_by_correctness(lengths, correct)
    # correct: 10, 30, 7, 9, 11, 3 x 4 -> 79 / 9; incorrect: 20, 40, 5 -> 65 / 3
    assert out["response_length/correct"] == pytest.approx(79 / 9)
    assert out["response_length/incorrect"] == pytest.approx(65 / 3)
    # group 0: 30 - 20 = 10; group 1: 5 - 9 = -4; group 2 has no incorrect: left out
    assert out["response_length/incorrect_minus_correct"] == pytest.approx(3.0)


def test_groups_of_one_outcome_give_no_gap():
    lengths = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert length_by_correctness(lengths, [True] * 4) == {"response_length/correct": 2.5}
    assert length_by_correctness(lengths, [False] * 4) == {"response_length/incorrect": 2.5}
    out = length_by_correctness(lengths, [True, True, False, False])
    assert "response_length/incorrect_minus_correct" not in out
