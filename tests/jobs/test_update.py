"""The controller's side of an update: advantages per sequence or per token reach every token."""

from __future__ import annotations

import pytest
import torch

from rlpost.algorithms.grpo import GRPO
from rlpost.data.batch import Sample
from rlpost.jobs.update import assign_advantages
from tests.run_helpers import read_metrics, run_train


def samples(lengths: list[int]) -> list[Sample]:
    return [Sample(prompt_ids=[1], response_ids=[2] * n, group=i // 2) for i, n in enumerate(lengths)]


def test_sequence_advantages_are_carried_by_every_token():
    batch = samples([2, 3, 1, 2])
    assign_advantages(batch, torch.tensor([[0.5, -0.5], [1.0, -1.0]]))
    assert [s.advantages.tolist() for s in batch] == [[0.5] * 2, [-0.5] * 3, [1.0], [-1.0] * 2]


def test_per_token_advantages_are_split_by_response_length():
    batch = samples([2, 3, 1, 2])
    assign_advantages(batch, torch.arange(8, dtype=torch.float64) / 4)
    assert [s.advantages.tolist() for s in batch] == [[0, 0.25], [0.5, 0.75, 1.0], [1.25], [1.5, 1.75]]
    assert all(s.advantages.dtype == torch.float32 for s in batch)


@pytest.mark.parametrize("shape", [(7,), (2, 2, 2), (8, 1)])
def test_advantages_of_another_shape_are_refused(shape):
    with pytest.raises(ValueError, match=r"one per response token \(8\)"):
        assign_advantages(samples([2, 3, 1, 2]), torch.zeros(shape))


class PerTokenGRPO(GRPO):
    """GRPO's advantages handed over in the per-token form (each A_i repeated |o_i| times):
    a user's algorithm by import path, which must train exactly as `grpo` does."""

    def advantages(self, rewards, lengths):
        per_sequence = super().advantages(rewards, lengths)
        return per_sequence.flatten().repeat_interleave(lengths.flatten())

    def select_samples(self, advantages, step):
        return None


def test_per_token_advantages_from_an_import_path_train_as_the_sequence_form(tmp_path):
    grpo = read_metrics(run_train(tmp_path / "grpo"))
    per_token = read_metrics(
        run_train(tmp_path / "per_token", "algorithm.name=tests.jobs.test_update:PerTokenGRPO")
    )
    # per-token advantages are also reported by token position (docs/algorithms.md section 5)
    by_position = {step: {k for k in m if k.startswith("advantage/pos_")} for step, m in per_token.items()}
    assert all(by_position[step] for step in range(1, 5))
    assert {
        step: {k: v for k, v in m.items() if k not in by_position[step]} for step, m in per_token.items()
    } == grpo
    assert grpo[4]["loss"] != 0.0  # the runs trained on a signal
