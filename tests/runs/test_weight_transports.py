"""Whole Ray runs through each weight transport: the bytes broadcast from the learners'
rank 0 to every engine (separate placement), and shared-memory handles from each learner
rank to the engine it is colocated with (IPC; CUDA IPC on GPUs), under ZeRO-1 and ZeRO-3.
Two learner ranks and two rollout workers, so both ranks send in the colocated runs. Where
the weights go must not change what the run computes."""

from __future__ import annotations

import pytest

from tests.run_helpers import read_metrics, run_train
from tests.runs.test_runs import assert_same_metrics

TWO_EACH = ("mode=ray", "learner.num_learners=2", "rollout.num_workers=2", "steps=3", "eval_every=0")


@pytest.mark.slow  # ~2 min on 2 cores; the transports' exactness is in tests/workers/test_weight_transfer.py
def test_ipc_and_broadcast_syncs_give_the_same_run(tmp_path):
    broadcast = read_metrics(run_train(tmp_path / "broadcast", *TWO_EACH, "ray.placement=separate"))
    ipc = read_metrics(run_train(tmp_path / "ipc", *TWO_EACH, "ray.placement=colocated"))
    zero3 = read_metrics(
        run_train(tmp_path / "zero3", *TWO_EACH, "ray.placement=colocated", "learner.zero_stage=3")
    )
    for metrics in (broadcast, ipc, zero3):
        assert sorted(metrics) == [0, 1, 2, 3]
        # each engine samples with the weights its learner holds after every sync
        assert max(metrics[s]["logprob_gap/rollout_vs_learner_max"] for s in (1, 2, 3)) < 1e-4
    assert_same_metrics(broadcast, ipc, range(4))
