"""GSPO-token (docs/algorithms.md section 6, `algorithm.name: gspo_token`): hand-computed
numbers, GSPO's loss and gradient when A is constant within each response, the token-level
clipped loss when all token ratios of a response are equal, and the same loss and gradient
under any split into micro-batches and learner ranks."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import ALGORITHMS, build_algorithm
from rlpost.algorithms.gspo import GSPO, GSPOToken
from rlpost.data.batch import Sample, view
from rlpost.errors import ConfigError
from tests.algorithms.split_check import (
    SPLITS,
    assert_split_invariant,
    make_batch,
    tokens,
    whole_loss_and_grad,
)


def test_registry_defaults_and_keys():
    algo = build_algorithm("gspo_token", {})
    assert ALGORITHMS["gspo_token"] is GSPOToken and isinstance(algo, GSPO)
    assert (algo.cfg.clip_eps_low, algo.cfg.clip_eps_high, algo.cfg.advantage) == (3e-4, 4e-4, "grpo")
    for key, value in [
        ("clip_eps_low", -0.1),
        ("clip_eps_high", -1e-4),
        ("advantage", "gae"),
        ("std_eps", 0),
    ]:
        with pytest.raises(ConfigError, match=f"key 'algorithm.{key}'"):
            build_algorithm("gspo_token", {key: value})
    with pytest.raises(ConfigError, match="unknown key 'algorithm.loss_agg'"):
        build_algorithm("gspo_token", {"loss_agg": "token-mean"})


def test_hand_computed_loss_and_gradient():
    """Response 0: log-ratios 0.3, -0.1 (s = e^0.1 = 1.10517, inside [0.8, 1.2]) with per-token
    advantages 1, -2; response 1: log-ratios 0.3 x 3 (s = e^0.3 = 1.34986 > 1.2) with A = 0.5,
    clipped: value -1.2 * 0.5 and no gradient. Weights 1/(S |o_i|): 1/4, 1/4, 1/6, 1/6, 1/6."""
    algo = build_algorithm("gspo_token", {"clip_eps_low": 0.2, "clip_eps_high": 0.2})
    t = tokens(
        [-0.7, -2.1, 0.0, -0.2, -0.7],
        [-1.0, -2.0, -0.3, -0.5, -1.0],
        [1.0, -2.0, 0.5, 0.5, 0.5],
        seq_index=[0, 0, 1, 1, 1],
    )
    t.logp.requires_grad_(True)
    loss, metrics = algo.token_loss(t)
    torch.testing.assert_close(
        loss.detach(),
        torch.tensor([-1.1051709180756477, 2.2103418361512953, -0.6, -0.6, -0.6], dtype=torch.float64),
    )
    w = torch.tensor([1 / 4, 1 / 4, 1 / 6, 1 / 6, 1 / 6], dtype=torch.float64)
    (grad,) = torch.autograd.grad((w * loss).sum(), t.logp)
    torch.testing.assert_close(
        grad, torch.tensor([-0.2762927295189119, 0.5525854590378238, 0.0, 0.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        (w * loss).sum().detach(), torch.tensor(-0.0237072704810881, dtype=torch.float64)
    )
    # ratio metrics are s_i's, per token; the clip fires for the whole of response 1
    torch.testing.assert_close(metrics["ratio_max"][2:], torch.full((3,), math.exp(0.3), dtype=torch.float64))
    assert metrics["clip_frac_high"].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    # GSPO on the same tokens: the same values, but one gradient per response from the mean A
    gspo_loss, _ = build_algorithm("gspo", {"clip_eps_low": 0.2, "clip_eps_high": 0.2}).token_loss(t)
    torch.testing.assert_close(gspo_loss.detach(), loss.detach())
    (gspo_grad,) = torch.autograd.grad((w * gspo_loss).sum(), t.logp)
    torch.testing.assert_close(gspo_grad[:2], torch.full((2,), 0.13814636475945596, dtype=torch.float64))
    torch.testing.assert_close(
        build_algorithm("gspo_token", {}).token_weights(view_of([2, 3])), w, rtol=0, atol=0
    )


def view_of(lengths):
    return view(
        [Sample(prompt_ids=[1], response_ids=[2] * n, group=0, advantages=torch.zeros(n)) for n in lengths]
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_gradient_when_advantage_is_constant_within_each_response(seed):
    samples, logp = make_batch(seed, scale=1e-3)
    token_loss, token_grad = whole_loss_and_grad(build_algorithm("gspo_token", {}), samples, logp)
    seq_loss, seq_grad = whole_loss_and_grad(build_algorithm("gspo", {}), samples, logp)
    torch.testing.assert_close(token_loss, seq_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(token_grad, seq_grad, rtol=1e-10, atol=1e-15)
    assert token_grad.abs().max() > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_token_clipped_loss_when_every_token_ratio_of_a_response_is_equal(seed):
    """s_i = r_{i,t} for every t, so GSPO-token is PPO's token-level clipped loss (GRPO with
    the same clip range, seq-mean-token-mean), per-token advantages included."""
    samples, logp = make_batch(seed, token_advantages=True)
    shifts = torch.linspace(-1e-3, 1e-3, len(samples), dtype=torch.float64)
    logp = torch.cat([s.old_logp + d for s, d in zip(samples, shifts)]).requires_grad_(True)
    got, got_grad = whole_loss_and_grad(build_algorithm("gspo_token", {}), samples, logp)
    grpo = build_algorithm(
        "grpo", {"clip_eps_low": 3e-4, "clip_eps_high": 4e-4, "loss_agg": "seq-mean-token-mean"}
    )
    want, want_grad = whole_loss_and_grad(grpo, samples, logp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-15)
    assert (got_grad == 0).any() and (got_grad != 0).any()  # some responses clip, some do not


@pytest.mark.parametrize("num_ranks, max_tokens, max_seqs", SPLITS)
def test_same_loss_and_gradient_under_any_split(num_ranks, max_tokens, max_seqs):
    samples, logp = make_batch(seed=3, scale=1e-3, token_advantages=True)
    assert_split_invariant(build_algorithm("gspo_token", {}), samples, logp, num_ranks, max_tokens, max_seqs)
