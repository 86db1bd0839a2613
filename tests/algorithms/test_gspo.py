"""GSPO (docs/algorithms.md section 6) against the formula written out sequence by sequence: the
loss, its gradient, and the same loss and gradient however the mini-batch is cut into
micro-batches and learner ranks (`data.batch.shard`, which keeps sequences whole)."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import ALGORITHMS, TokenTensors, build_algorithm
from rlpost.algorithms.advantages import grpo
from rlpost.data.batch import Sample, shard
from tests.algorithms.split_check import micro_loss, offsets, weighted

EPS_LOW, EPS_HIGH = 3e-4, 4e-4
LENGTHS = [3, 7, 1, 5, 4, 2, 6, 8]  # two groups of four
GROUP = 4


def make_batch(seed: int = 0):
    """Samples with GRPO advantages of random rewards, and a leaf `logp` [T] whose
    per-token log-ratios to old_logp are of the order of the clip range, so that some
    sequences clip low, some high and some not at all."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(len(LENGTHS) // GROUP, GROUP, generator=g, dtype=torch.float64)
    adv = grpo(rewards).reshape(-1)
    samples, logps = [], []
    for i, n in enumerate(LENGTHS):
        old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
        shift = (torch.rand((), generator=g, dtype=torch.float64) - 0.5) * 2e-3
        logps.append(old + shift + torch.randn(n, generator=g, dtype=torch.float64) * 1e-4)
        samples.append(
            Sample(
                prompt_ids=[1, 2],
                response_ids=[3] * n,
                group=i // GROUP,
                advantages=torch.full((n,), float(adv[i]), dtype=torch.float64),
                old_logp=old,
            )
        )
    logp = torch.cat(logps).requires_grad_(True)
    return samples, logp


def by_hand(samples, logp) -> torch.Tensor:
    """mean_i -min(s_i A_i, clip(s_i, 1 - eps_l, 1 + eps_h) A_i), s_i = exp(mean_t log r)."""
    losses, start = [], 0
    for s in samples:
        n = s.num_tokens
        s_i = torch.exp((logp[start : start + n] - s.old_logp).mean())
        a = s.advantages[0]
        losses.append(-torch.minimum(s_i * a, torch.clamp(s_i, 1 - EPS_LOW, 1 + EPS_HIGH) * a))
        start += n
    return torch.stack(losses).mean()


def test_defaults_and_registry():
    algo = build_algorithm("gspo", {})
    assert ALGORITHMS["gspo"] is type(algo)
    assert (algo.cfg.clip_eps_low, algo.cfg.clip_eps_high, algo.cfg.advantage) == (EPS_LOW, EPS_HIGH, "grpo")
    assert not algo.needs.reference and not algo.needs.old_policy_entropy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_equal_the_formula(seed):
    algo = build_algorithm("gspo", {})
    samples, logp = make_batch(seed)
    weighted(algo, samples)
    want = by_hand(samples, logp)
    (want_grad,) = torch.autograd.grad(want, logp)
    got = micro_loss(algo, samples, logp, offsets(samples))
    (got_grad,) = torch.autograd.grad(got, logp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-15)
    # the batch exercises both clip sides and the unclipped range
    start, ratios = 0, []
    for s in samples:
        ratios.append(math.exp(float((logp.detach()[start : start + s.num_tokens] - s.old_logp).mean())))
        start += s.num_tokens
    assert min(ratios) < 1 - EPS_LOW and max(ratios) > 1 + EPS_HIGH
    assert any(1 - EPS_LOW < r < 1 + EPS_HIGH for r in ratios)


def test_ratio_is_length_normalised():
    """A response twice as long with the same per-token log-ratio has the same s_i."""
    algo = build_algorithm("gspo", {"clip_eps_low": 1.0, "clip_eps_high": 1.0})

    def t(n):
        return TokenTensors(
            logp=torch.full((n,), -1.0 + 0.01),
            old_logp=torch.full((n,), -1.0),
            advantages=torch.ones(n),
            entropy=None,
            ref_logp=None,
            seq_index=torch.zeros(n, dtype=torch.long),
        )

    short, _ = algo.token_loss(t(3))
    long, metrics = algo.token_loss(t(6))
    torch.testing.assert_close(short, torch.full((3,), -math.exp(0.01)))
    torch.testing.assert_close(long, torch.full((6,), -math.exp(0.01)))
    torch.testing.assert_close(metrics["ratio_max"], torch.full((6,), math.exp(0.01)))


@pytest.mark.parametrize(
    "num_ranks, max_tokens, max_seqs",
    [(1, None, 1), (1, 12, None), (2, None, 2), (2, 9, None), (4, None, None), (3, 5, 2)],
)
def test_same_loss_and_gradient_under_any_split(num_ranks, max_tokens, max_seqs):
    algo = build_algorithm("gspo", {})
    samples, logp = make_batch(seed=3)
    weighted(algo, samples)  # over the whole mini-batch, before the split
    start = offsets(samples)
    whole = micro_loss(algo, samples, logp, start)
    (whole_grad,) = torch.autograd.grad(whole, logp)
    ranks = shard(samples, num_ranks, max_tokens, max_seqs)
    micros = [m for rank in ranks for m in rank if m]
    assert sorted(id(s) for m in micros for s in m) == sorted(map(id, samples))  # sequences whole
    split = sum(micro_loss(algo, m, logp, start) for m in micros)
    (split_grad,) = torch.autograd.grad(split, logp)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(split, by_hand(samples, logp), rtol=1e-12, atol=1e-15)
