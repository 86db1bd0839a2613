"""After a weight sync, the rollout engine scores fixed sequences as the learner does.

The learner takes a few large steps so its weights are far from the engine's;
after `update_weights`, the engine's log-probs of fixed sequences must equal the
learner's within 1e-5 (fp32), and must have moved by far more than that.
"""

from __future__ import annotations

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.config.rl import TrainConfig
from rlpost.config.sections import ModelConfig
from rlpost.data.batch import Sample, view
from rlpost.model.load import materialise_initial_model
from rlpost.workers.learner import Learner, LRSchedule
from rlpost.workers.rollout import RolloutWorker

TOL = 1e-5


def fixed_samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for p_len, r_len in [(5, 3), (7, 4), (4, 6), (6, 2)]:
        ids = torch.randint(3, 15, (p_len + r_len,), generator=g).tolist()
        samples.append(
            Sample(
                prompt_ids=[1] + ids[:p_len],
                response_ids=ids[p_len:],
                advantages=torch.full((r_len,), 1.0 if r_len % 2 else -1.0),
            )
        )
    return samples


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_engine_matches_learner_after_sync(engine, tmp_path):
    model_dir = materialise_initial_model(
        ModelConfig(hidden_size=128, intermediate_size=256),
        "0123456789+=",
        seed=0,
        out_dir=tmp_path / "m",
        max_len=64,
    )
    cfg = TrainConfig(mode="inprocess")
    cfg.rollout.engine = engine
    learner = Learner(cfg, str(model_dir), ("sft", {}), LRSchedule(1e-2), rank=0, world_size=1, pad_id=0)
    learner.setup(*learner.rendezvous())
    samples = fixed_samples()
    weights = build_algorithm("sft", {}).token_weights(view(samples))
    for s, w in zip(samples, weights.split([s.num_tokens for s in samples])):
        s.weights = w
    for _ in range(5):
        learner.train_minibatch([samples])
    learner_logp = learner.logprobs([samples])["logp"].split([s.num_tokens for s in samples])

    worker = RolloutWorker(str(model_dir), cfg.rollout, "float32", seed=0, rank=0)
    try:
        sequences = [s.prompt_ids + s.response_ids for s in samples]
        before = worker.sequence_logprobs(sequences)
        worker.update_weights(learner.export_weights())
        after = worker.sequence_logprobs(sequences)
    finally:
        worker.shutdown()
        learner.shutdown()

    moved = 0.0
    for s, lp, b, a in zip(samples, learner_logp, before, after):
        r = s.num_tokens
        torch.testing.assert_close(torch.tensor(a[-r:]), lp, rtol=0, atol=TOL)
        moved = max(moved, (torch.tensor(b[-r:]) - lp).abs().max().item())
    assert moved > 100 * TOL
