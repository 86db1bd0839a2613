"""`learner.offload_optimizer` on a real DeepSpeed learner (ZeRO-1 and 2, in this process,
on CPU): DeepSpeed's `offload_states` takes Adam's state and the fp32 master weights and
`reload_states` gives them back, and training goes on exactly as if they had never left,
checkpoints saved in between included.

On CPU, DeepSpeed's accelerator memory is host memory, so nothing changes device: what runs
is the bookkeeping (the master weights unlinked from the model's parameters and linked
again), which is where an offload that corrupts training would show. The move to and from
a GPU has not run here."""

from __future__ import annotations

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.config.rl import TrainConfig
from rlpost.data.batch import Sample, shard, view
from rlpost.workers.learner import LRSchedule, start_learner_group

ALGO = ("grpo", {})


def samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (p_len, r_len) in enumerate([(4, 3), (6, 5), (3, 6), (5, 2)]):
        ids = torch.randint(3, 15, (p_len + r_len,), generator=g).tolist()
        out.append(
            Sample(
                prompt_ids=[1] + ids[:p_len],
                response_ids=ids[p_len:],
                group=i // 2,
                advantages=torch.full((r_len,), torch.randn((), generator=g).item()),
                old_logp=torch.log(torch.rand(r_len, generator=g) * 0.2 + 0.02),
            )
        )
    for s, w in zip(out, build_algorithm(*ALGO).token_weights(view(out)).split([s.num_tokens for s in out])):
        s.weights = w
    return out


def learners(model_dir, zero_stage: int):
    cfg = TrainConfig(mode="inprocess")
    cfg.learner.zero_stage = zero_stage
    cfg.learner.offload_optimizer = True
    return start_learner_group(cfg, model_dir, ALGO, LRSchedule(1e-2), pad_id=0, use_ray=False)


def micro_batches() -> list[list[Sample]]:
    (rank_0,) = shard(samples(), 1, max_seqs=2)
    return rank_0


def update(group) -> None:
    group.call("train_minibatch", micro_batches())


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_offloaded_state_trains_and_checkpoints_as_if_it_never_left(model_dir, tmp_path, zero_stage):
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as State

    group = learners(model_dir, zero_stage)
    try:
        optimizer = group.workers[0].engine.optimizer
        update(group)
        group.call("offload_optimizer")
        assert optimizer.offloaded_states == {State.optim_states, State.hp_params}
        # the model's own weights stay: the log-prob pass and the sync read them
        group.call("logprobs", micro_batches())
        group.call("save_checkpoint", str(tmp_path), "offloaded")
        after_one = group.call("named_parameters")[0]
        group.call("reload_optimizer")
        assert not optimizer.offloaded_states
        update(group)
        group.call("offload_optimizer")
        group.call("reload_optimizer")
        update(group)
        offloaded = group.call("named_parameters")[0]
    finally:
        group.shutdown()

    # the same updates from the checkpoint taken while the state was away, never offloaded
    group = learners(model_dir, zero_stage)
    try:
        group.call("load_checkpoint", str(tmp_path), "offloaded")
        assert_same(group.call("named_parameters")[0], after_one)
        update(group)
        update(group)
        assert_same(group.call("named_parameters")[0], offloaded)
    finally:
        group.shutdown()
    assert any(not torch.equal(after_one[n], offloaded[n]) for n in offloaded)  # it trained
