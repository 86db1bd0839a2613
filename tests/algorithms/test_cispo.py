"""CISPO (docs/algorithms.md section 6, `algorithm.name: cispo`): hand-computed values and
gradients under the default bounds (no lower clip, weight capped at 5) and under both bounds
set, a non-zero gradient where PPO's clip gives none, the plain policy gradient on-policy,
every key checked, and the same loss and gradient under any split."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import ALGORITHMS, MiniBatchView, build_algorithm
from rlpost.algorithms.cispo import CISPO
from rlpost.errors import ConfigError
from tests.algorithms.split_check import (
    SPLITS,
    assert_split_invariant,
    make_batch,
    tokens,
    whole_loss_and_grad,
)

# log-ratios 2, 0, -1.5, 0.1 (r = 7.389, 1, 0.2231, 1.1052); A = 1, -1, 2, 0.5
LOGP, OLD, ADV = [-0.5, -1.0, -2.0, -0.1], [-2.5, -1.0, -0.5, -0.2], [1.0, -1.0, 2.0, 0.5]
F64 = dict(dtype=torch.float64)


def test_registry_defaults_and_keys():
    algo = build_algorithm("cispo", {})
    assert ALGORITHMS["cispo"] is CISPO
    c = algo.cfg
    assert (c.clip_eps_low, c.clip_eps_high, c.loss_agg, c.advantage) == (None, 4.0, "token-mean", "grpo")
    assert not algo.needs.reference and not algo.needs.old_policy_entropy
    for key, value in [
        ("clip_eps_low", -0.1),
        ("clip_eps_high", -1.0),
        ("loss_agg", "constant"),
        ("std_eps", 0),
        ("advantage", "gae"),
    ]:
        with pytest.raises(ConfigError, match=f"key 'algorithm.{key}'"):
            build_algorithm("cispo", {key: value})
    with pytest.raises(ConfigError, match="unknown key 'algorithm.dual_clip'"):
        build_algorithm("cispo", {"dual_clip": 3.0})


def loss_and_grad(params):
    algo = build_algorithm("cispo", params)
    t = tokens(LOGP, OLD, ADV)
    t.logp.requires_grad_(True)
    loss, metrics = algo.token_loss(t)
    total = (algo.token_weights(view_of_one(4)) * loss).sum()
    (grad,) = torch.autograd.grad(total, t.logp)
    return loss.detach(), total.detach(), grad, metrics


def view_of_one(n):
    return MiniBatchView(
        seq_index=torch.zeros(n, dtype=torch.long),
        lengths=torch.tensor([n]),
        advantages=torch.tensor(ADV),
        group_index=torch.tensor([0]),
        num_sequences=1,
    )


def test_default_bounds_by_hand():
    """Weights min(r, 5): 5, 1, e^-1.5, e^0.1 (no lower clip); l = -w A log pi;
    token-mean: the gradient of each token is -w A / 4."""
    loss, total, grad, metrics = loss_and_grad({})
    w = [5.0, 1.0, math.exp(-1.5), math.exp(0.1)]
    torch.testing.assert_close(metrics["is_weight"], torch.tensor(w, **F64))
    torch.testing.assert_close(loss, torch.tensor([2.5, -1.0, 4 * w[2], 0.05 * w[3]], **F64))
    torch.testing.assert_close(total, torch.tensor(0.6119447966243754, **F64))
    torch.testing.assert_close(grad, torch.tensor([-1.25, 0.25, -0.5 * w[2], -0.125 * w[3]], **F64))
    assert metrics["clip_frac_high"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert metrics["clip_frac_low"].tolist() == [0.0] * 4  # no lower bound
    torch.testing.assert_close(metrics["ratio_max"][0], torch.tensor(math.exp(2.0), **F64))


def test_both_bounds_by_hand():
    """Bounds [0.5, 1.2]: weights 1.2, 1, 0.5, e^0.1."""
    loss, total, grad, metrics = loss_and_grad({"clip_eps_low": 0.5, "clip_eps_high": 0.2})
    torch.testing.assert_close(metrics["is_weight"], torch.tensor([1.2, 1.0, 0.5, math.exp(0.1)], **F64))
    torch.testing.assert_close(loss, torch.tensor([0.6, -1.0, 2.0, 0.05 * math.exp(0.1)], **F64))
    torch.testing.assert_close(total, torch.tensor(0.41381463647594563, **F64))
    torch.testing.assert_close(grad, torch.tensor([-0.3, 0.25, -0.25, -0.125 * math.exp(0.1)], **F64))
    assert metrics["clip_frac_high"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert metrics["clip_frac_low"].tolist() == [0.0, 0.0, 1.0, 0.0]
    # no bounds at all: the weight is the ratio itself
    _, _, _, unbounded = loss_and_grad({"clip_eps_high": None})
    ratio = (torch.tensor(LOGP, **F64) - torch.tensor(OLD, **F64)).exp()
    torch.testing.assert_close(unbounded["is_weight"], ratio)


def test_clipped_tokens_keep_their_gradient():
    """Token 0 (r = 7.39 > 1.2, A > 0) and token 2 (r = 0.22 < 0.8, A > 0 — PPO's min keeps
    the unclipped term there) and a token with r < 0.8, A < 0: GRPO's clip zeroes the first and
    the last, CISPO keeps -w A / T for all."""
    logp, old, adv = [-0.5, -2.0, -2.0], [-2.5, -0.5, -0.5], [1.0, 1.0, -1.0]
    t = tokens(logp, old, adv)
    t.logp.requires_grad_(True)
    grpo = build_algorithm("grpo", {})
    g_grpo = torch.autograd.grad(grpo.token_loss(t)[0].sum(), t.logp)[0]
    g_cispo = torch.autograd.grad(
        build_algorithm("cispo", {"clip_eps_high": 0.2}).token_loss(t)[0].sum(), t.logp
    )[0]
    assert g_grpo[0] == 0 and g_grpo[2] == 0
    torch.testing.assert_close(g_cispo, torch.tensor([-1.2, -math.exp(-1.5), math.exp(-1.5)], **F64))


def test_on_policy_gradient_is_the_policy_gradient():
    """At r = 1 the weight is 1 and the gradient -A grad log pi, GRPO's (token-mean)."""
    samples, _ = make_batch(seed=0)
    logp = torch.cat([s.old_logp for s in samples]).requires_grad_(True)
    _, g_cispo = whole_loss_and_grad(build_algorithm("cispo", {}), samples, logp)
    _, g_grpo = whole_loss_and_grad(build_algorithm("grpo", {}), samples, logp)
    torch.testing.assert_close(g_cispo, g_grpo, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_agg", ["token-mean", "balanced"])
@pytest.mark.parametrize("num_ranks, max_tokens, max_seqs", SPLITS)
def test_same_loss_and_gradient_under_any_split(loss_agg, num_ranks, max_tokens, max_seqs):
    samples, logp = make_batch(seed=4, scale=1.0)
    algo = build_algorithm("cispo", {"clip_eps_low": 0.3, "loss_agg": loss_agg})
    assert_split_invariant(algo, samples, logp, num_ranks, max_tokens, max_seqs)
