"""GMPO (docs/algorithms.md section 6, `algorithm.name: gmpo`): hand-computed values and
gradients, the per-token clip in log space by the sign of A, the unclipped objective equal
to GSPO's without a clip, every key checked, and the same loss and gradient under any split."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import ALGORITHMS, build_algorithm
from rlpost.algorithms.gmpo import GMPO
from rlpost.data.batch import Sample, view
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
    algo = build_algorithm("gmpo", {})
    assert ALGORITHMS["gmpo"] is GMPO
    assert (algo.cfg.clip_eps, algo.cfg.advantage) == (0.4, "grpo")
    for key, value in [("clip_eps", 0.0), ("clip_eps", "wide"), ("advantage", "ppo"), ("std_eps", -1.0)]:
        with pytest.raises(ConfigError, match=f"key 'algorithm.{key}'"):
            build_algorithm("gmpo", {key: value})
    with pytest.raises(ConfigError, match="unknown key 'algorithm.clip_eps_high'"):
        build_algorithm("gmpo", {"clip_eps_high": 0.2})


def test_hand_computed_loss_and_gradient():
    """Response 0, A = 1, d = 0.6, -0.2, -0.7: d~ = 0.4 (capped, no gradient), -0.2, -0.7
    (a low ratio is not floored when A > 0), mean -1/6, loss_0 = -e^(-1/6) = -0.84648.
    Response 1, A = -2, d = 0.5, -0.6: d~ = 0.5, -0.4 (floored), mean 0.05,
    loss_1 = 2 e^0.05 = 2.10254. Loss (loss_0 + loss_1) / 2; the gradient of a free token of
    response i is -A_i e^(mean d~) / (2 |o_i|)."""
    algo = build_algorithm("gmpo", {})
    t = tokens([0.6, -0.2, -0.7, 0.5, -0.6], [0.0] * 5, [1.0, 1.0, 1.0, -2.0, -2.0], [0, 0, 0, 1, 1])
    t.logp.requires_grad_(True)
    loss, metrics = algo.token_loss(t)
    e0, e1 = math.exp(-1 / 6), math.exp(0.05)
    torch.testing.assert_close(loss.detach(), torch.tensor([-e0] * 3 + [2 * e1] * 2, **F64))
    lengths = [3, 2]
    batch = view([Sample(prompt_ids=[1], response_ids=[2] * n, advantages=torch.zeros(n)) for n in lengths])
    w = algo.token_weights(batch)
    torch.testing.assert_close(w, torch.tensor([1 / 6] * 3 + [1 / 4] * 2, **F64))
    total = (w * loss).sum()
    torch.testing.assert_close(total.detach(), torch.tensor(0.6280302339307171, **F64))
    (grad,) = torch.autograd.grad(total, t.logp)
    torch.testing.assert_close(grad, torch.tensor([0.0, -e0 / 6, -e0 / 6, e1 / 2, 0.0], **F64))
    assert metrics["clip_frac_high"].tolist() == [1.0, 0, 0, 0, 0]
    assert metrics["clip_frac_low"].tolist() == [0, 0, 0, 0, 1.0]
    torch.testing.assert_close(metrics["geo_ratio"], torch.tensor([e0] * 3 + [e1] * 2, **F64))


def test_unclipped_is_gspo_without_a_clip():
    """With eps beyond every |d_t|, loss_i = -A_i exp(mean_t d_t) = -A_i s_i: GSPO with a
    range that never clips (value and gradient)."""
    samples, logp = make_batch(seed=1, scale=0.5)
    got, got_grad = whole_loss_and_grad(build_algorithm("gmpo", {"clip_eps": 100.0}), samples, logp)
    gspo = build_algorithm("gspo", {"clip_eps_low": 1.0, "clip_eps_high": 1e6})
    want, want_grad = whole_loss_and_grad(gspo, samples, logp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-15)
    # with the default eps some tokens clip, and only those lose their gradient
    _, clipped_grad = whole_loss_and_grad(build_algorithm("gmpo", {}), samples, logp)
    assert (clipped_grad == 0).any() and (clipped_grad != 0).sum() > (clipped_grad == 0).sum()


def test_outlying_token_moves_the_geometric_mean_less():
    """One token of four with log-ratio 3 (no clip): the geometric-mean ratio is e^0.75 = 2.117,
    the arithmetic mean of the ratios (e^3 + 3) / 4 = 5.771."""
    t = tokens([3.0, 0.0, 0.0, 0.0], [0.0] * 4, [1.0] * 4)
    _, metrics = build_algorithm("gmpo", {"clip_eps": 10.0}).token_loss(t)
    torch.testing.assert_close(metrics["geo_ratio"], torch.full((4,), math.exp(0.75), **F64))
    assert metrics["ratio_max"].mean() > 5.77 > 2.12 > metrics["geo_ratio"].max()


@pytest.mark.parametrize("token_advantages", [False, True])
@pytest.mark.parametrize("num_ranks, max_tokens, max_seqs", SPLITS)
def test_same_loss_and_gradient_under_any_split(token_advantages, num_ranks, max_tokens, max_seqs):
    samples, logp = make_batch(seed=5, scale=0.5, token_advantages=token_advantages)
    assert_split_invariant(build_algorithm("gmpo", {}), samples, logp, num_ranks, max_tokens, max_seqs)
