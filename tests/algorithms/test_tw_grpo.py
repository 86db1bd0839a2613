"""TW-GRPO position weights: D_t and w_t against the formula, the learner's chunked
full-vocabulary pass against a plain forward, and the weights in the loss."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.aggregation import aggregate
from rlpost.algorithms.base import position_divergence
from rlpost.algorithms.selection import position_weights
from rlpost.config.rl import TrainConfig
from rlpost.data.batch import Sample, view
from rlpost.model.load import load_model
from rlpost.workers.learner import LRSchedule, start_learner_group


def divergence_by_loops(probs: list[list[list[float]]]) -> list[float]:
    """D_t = (1/G) sum_i KL(p_i,t || g_t), g_t proportional to prod_i p_i,t^(1/G); plain floats."""
    G, L, V = len(probs), len(probs[0]), len(probs[0][0])
    out = []
    for t in range(L):
        g = [math.prod(probs[i][t][v] for i in range(G)) ** (1 / G) for v in range(V)]
        z = sum(g)
        g = [x / z for x in g]
        out.append(sum(sum(p * math.log(p / q) for p, q in zip(probs[i][t], g)) for i in range(G)) / G)
    return out


def test_position_divergence_numbers():
    # by hand: g ~ sqrt(0.5 * 0.9), sqrt(0.5 * 0.1) = (0.75, 0.25) after normalising;
    # KL(p1 || g) = 0.143841, KL(p2 || g) = 0.072461, mean 0.108151
    d = position_divergence(torch.tensor([[[0.5, 0.5]], [[0.9, 0.1]]]).log())
    assert d.tolist() == pytest.approx([0.108151], abs=1e-6)
    # identical rollouts do not disagree anywhere
    same = torch.randn(1, 3, 7, dtype=torch.float64).log_softmax(-1).expand(4, 3, 7)
    assert position_divergence(same).abs().max().item() < 1e-12
    probs = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0)).softmax(-1).double()
    assert position_divergence(probs.log()).tolist() == pytest.approx(
        divergence_by_loops(probs.tolist()), rel=1e-12
    )


def test_position_weights_numbers():
    w = position_weights(torch.tensor([0.1, 0.3, 0.2]), alpha=1.7)
    assert w.tolist() == pytest.approx([1.0, 1.7, 1.35])
    assert position_weights(torch.tensor([0.4, 0.4]), alpha=1.7).tolist() == [1.0, 1.0]
    assert position_weights(torch.tensor([0.2]), alpha=1.7).tolist() == [1.0]


def test_position_weights_multiply_the_aggregation_weights():
    samples = [
        Sample(prompt_ids=[1], response_ids=[3] * n, group=0, advantages=torch.full((n,), a))
        for n, a in ((2, 1.0), (3, -1.0), (1, 0.5))
    ]
    scale = [torch.tensor([1.0, 1.7]), torch.tensor([1.0, 1.7, 1.35]), torch.tensor([1.0])]
    for s, w in zip(samples, scale):
        s.extra["token_scale"] = w.double()
    algo = build_algorithm("grpo", {"tw_alpha": 1.7, "loss_agg": "seq-mean-token-mean"})
    assert algo.needs.position_divergence
    got = algo.token_weights(view(samples))
    # seq-mean-token-mean: 1 / (3 |o_i|) per token, times the position weight
    expected = torch.tensor([1 / 6, 1.7 / 6, 1 / 9, 1.7 / 9, 1.35 / 9, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, aggregate("seq-mean-token-mean", view(samples)) * torch.cat(scale))
    assert not build_algorithm("grpo", {}).needs.position_divergence


def make_groups() -> list[list[Sample]]:
    g = torch.Generator().manual_seed(0)
    groups = []
    for prompt_len, lengths in ((4, (1, 5, 3)), (6, (2, 2, 7))):
        prompt = [1] + torch.randint(3, 15, (prompt_len,), generator=g).tolist()
        groups.append(
            [
                Sample(prompt_ids=prompt, response_ids=torch.randint(3, 15, (n,), generator=g).tolist())
                for n in lengths
            ]
        )
    return groups


def reference_divergence(model, group: list[Sample], temperature: float) -> list[float]:
    """Plain forward per rollout, uniform rows past its end, then the loops above."""
    longest = max(s.num_tokens for s in group)
    vocab = model.config.vocab_size
    probs = []
    with torch.no_grad():
        for s in group:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            p = len(s.prompt_ids)
            rows = (model(input_ids=ids).logits[0, p - 1 : -1].double() / temperature).softmax(-1).tolist()
            probs.append(rows + [[1 / vocab] * vocab] * (longest - len(rows)))
    return divergence_by_loops(probs)


@pytest.mark.parametrize(
    "packing, chunk, temperature", [("padded", 1024, 1.0), ("padded", 1, 0.7), ("packed", 4, 1.0)]
)
def test_learner_position_divergence_matches_formula(model_dir, packing, chunk, temperature):
    cfg = TrainConfig(mode="inprocess")
    cfg.learner.packing = packing
    cfg.learner.logprob_chunk_size = chunk  # 1 and 4: one and one-to-two positions per chunk
    cfg.rollout.temperature = temperature
    group = start_learner_group(
        cfg, model_dir, ("grpo", {"tw_alpha": 1.7}), LRSchedule(1e-3), pad_id=0, use_ray=False
    )
    try:
        groups = make_groups()
        got = group.call("position_divergence", groups)[0]
    finally:
        group.shutdown()
    model = load_model(model_dir)
    for g, d in zip(groups, got):
        assert d.shape == (max(s.num_tokens for s in g),)
        assert d.tolist() == pytest.approx(reference_divergence(model, g, temperature), rel=1e-5, abs=1e-7)
