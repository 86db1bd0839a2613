"""SAPO (docs/algorithms.md section 6, `algorithm.name: sapo`): hand-computed values and
gradients of the soft gate, the plain policy gradient on-policy, a gradient that decays
smoothly and never vanishes where PPO's clip zeroes it, faster for A < 0, every key checked,
and the same loss and gradient under any split."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import ALGORITHMS, build_algorithm
from rlpost.algorithms.sapo import SAPO
from rlpost.errors import ConfigError
from tests.algorithms.split_check import (
    SPLITS,
    assert_split_invariant,
    make_batch,
    tokens,
    whole_loss_and_grad,
)

F64 = dict(dtype=torch.float64)


def test_registry_defaults_and_keys():
    algo = build_algorithm("sapo", {})
    assert ALGORITHMS["sapo"] is SAPO
    c = algo.cfg
    assert (c.tau_pos, c.tau_neg, c.loss_agg, c.advantage) == (1.0, 1.05, "token-mean", "grpo")
    for key, value in [
        ("tau_pos", 0.0),
        ("tau_neg", -1.0),
        ("loss_agg", "sum"),
        ("advantage", "x"),
        ("std_eps", 0),
    ]:
        with pytest.raises(ConfigError, match=f"key 'algorithm.{key}'"):
            build_algorithm("sapo", {key: value})
    with pytest.raises(ConfigError, match="unknown key 'algorithm.clip_eps_low'"):
        build_algorithm("sapo", {"clip_eps_low": 0.2})


def test_hand_computed_values_and_gradients():
    """l = -sigmoid(tau (r - 1)) 4 / tau A, per token d l / d log pi = -4 s (1 - s) r A.
    Tokens: (log r, A) = (0, 1), (0.5, 1), (-0.5, -1), (2, 2), (0, -1); tau 1 for A > 0,
    1.05 for A < 0."""
    t = tokens([0.0, 0.5, -0.5, 2.0, 0.0], [0.0] * 5, [1.0, 1.0, -1.0, 2.0, -1.0])
    t.logp.requires_grad_(True)
    loss, metrics = build_algorithm("sapo", {}).token_loss(t)
    want = [-2.0, -2.6268889844843373, 1.5167953328585435, -7.986583808612576, 2 / 1.05]
    torch.testing.assert_close(loss.detach(), torch.tensor(want, **F64))
    (grad,) = torch.autograd.grad(loss.sum(), t.logp)
    want_grad = [-1.0, -1.48673861055975, 0.5813678009099889, -0.09896674239849763, 1.0]
    torch.testing.assert_close(grad, torch.tensor(want_grad, **F64))
    gate = [1.0, 0.9017525502830491, 0.958513459460456, 0.0066968460567527815, 1.0]
    torch.testing.assert_close(metrics["gate_weight"], torch.tensor(gate, **F64))


def test_on_policy_gradient_is_the_policy_gradient():
    samples, _ = make_batch(seed=0)
    logp = torch.cat([s.old_logp for s in samples]).requires_grad_(True)
    _, g_sapo = whole_loss_and_grad(build_algorithm("sapo", {}), samples, logp)
    _, g_grpo = whole_loss_and_grad(build_algorithm("grpo", {}), samples, logp)
    torch.testing.assert_close(g_sapo, g_grpo, rtol=1e-12, atol=1e-15)


def test_gate_decays_smoothly_and_faster_for_negative_advantages():
    """The gradient of a token, relative to the unclipped -A grad r, is 4 s (1 - s): smaller
    the further r is from 1, never 0 (PPO's clip gives 0 at r = 1.5 with A > 0), and smaller
    under tau_neg = 1.05 than tau_pos = 1 at the same r."""
    d = torch.linspace(-1.0, 1.0, 9, **F64)
    up = build_algorithm("sapo", {}).token_loss(tokens(d, torch.zeros(9), torch.ones(9)))[1]["gate_weight"]
    down = build_algorithm("sapo", {}).token_loss(tokens(d, torch.zeros(9), -torch.ones(9)))[1]["gate_weight"]
    assert (up > 0).all() and up[4] == 1.0 and (up[5:].diff() < 0).all() and (up[:4].diff() > 0).all()
    assert (down[d != 0] < up[d != 0]).all()
    t = tokens([math.log(1.5)], [0.0], [1.0])
    t.logp.requires_grad_(True)
    assert torch.autograd.grad(build_algorithm("grpo", {}).token_loss(t)[0].sum(), t.logp)[0] == 0
    assert torch.autograd.grad(build_algorithm("sapo", {}).token_loss(t)[0].sum(), t.logp)[0] < 0


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("num_ranks, max_tokens, max_seqs", SPLITS)
def test_same_loss_and_gradient_under_any_split(loss_agg, num_ranks, max_tokens, max_seqs):
    samples, logp = make_batch(seed=6, scale=0.5, token_advantages=True)
    algo = build_algorithm("sapo", {"loss_agg": loss_agg})
    assert_split_invariant(algo, samples, logp, num_ranks, max_tokens, max_seqs)
