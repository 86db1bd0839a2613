"""The DPPO trust-region mask (docs/algorithms.md section 6, `algorithm.name: dppo`):
hand-computed values, gradients and masks on probabilities (not ratios), where it differs
from PPO's ratio clip, every key checked, and the same loss and gradient under any split."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import ALGORITHMS, MiniBatchView, build_algorithm
from rlpost.algorithms.dppo import DPPO
from rlpost.errors import ConfigError
from tests.algorithms.split_check import SPLITS, assert_split_invariant, make_batch, tokens

F64 = dict(dtype=torch.float64)
# (p_old, p, A): a rise of 0.3 with A > 0 (masked); a rise of 0.1 (kept); a rare token
# 0.01 -> 0.05, ratio 5 but a rise of 0.04 (kept; PPO clips it); a fall of 0.3 with A < 0
# (masked); a fall of 0.1 (kept); a fall of 0.3 with A > 0 (kept: the advantage pulls back)
ROWS = [
    (0.5, 0.8, 1.0),
    (0.5, 0.6, 1.0),
    (0.01, 0.05, 1.0),
    (0.9, 0.6, -1.0),
    (0.9, 0.8, -1.0),
    (0.4, 0.1, 1.0),
]


def row_tokens():
    old, new, adv = zip(*ROWS)
    t = tokens([math.log(p) for p in new], [math.log(p) for p in old], adv)
    t.logp.requires_grad_(True)
    return t


def test_registry_defaults_and_keys():
    algo = build_algorithm("dppo", {})
    assert ALGORITHMS["dppo"] is DPPO
    c = algo.cfg
    assert (c.delta_low, c.delta_high, c.loss_agg, c.advantage) == (0.2, 0.2, "token-mean", "grpo")
    for key, value in [
        ("delta_low", 0.0),
        ("delta_high", 1.5),
        ("delta_high", None),
        ("advantage", "gae"),
        ("loss_agg", "constant"),
        ("std_eps", 0),
    ]:
        with pytest.raises(ConfigError, match=f"key 'algorithm.{key}'"):
            build_algorithm("dppo", {key: value})
    with pytest.raises(ConfigError, match="unknown key 'algorithm.clip_eps_high'"):
        build_algorithm("dppo", {"clip_eps_high": 0.2})


def test_hand_computed_loss_gradient_and_mask():
    """l = -r A (value kept when masked), token-mean over 6: the gradient of a kept token is
    -r A / 6, of a masked one 0."""
    algo = build_algorithm("dppo", {})
    t = row_tokens()
    loss, metrics = algo.token_loss(t)
    n = len(ROWS)
    batch = MiniBatchView(
        seq_index=torch.zeros(n, dtype=torch.long),
        lengths=torch.tensor([n]),
        advantages=t.advantages,
        group_index=torch.tensor([0]),
        num_sequences=1,
    )
    total = (algo.token_weights(batch) * loss).sum()
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.6, -1.2, -5.0, 2 / 3, 8 / 9, -0.25], **F64))
    torch.testing.assert_close(total.detach(), torch.tensor(-1.0824074074074073, **F64))
    (grad,) = torch.autograd.grad(total, t.logp)
    torch.testing.assert_close(grad, torch.tensor([0.0, -0.2, -5 / 6, 0.0, 8 / 54, -0.25 / 6], **F64))
    assert metrics["clip_frac_high"].tolist() == [1.0, 0, 0, 0, 0, 0]
    assert metrics["clip_frac_low"].tolist() == [0, 0, 0, 1.0, 0, 0]
    torch.testing.assert_close(
        metrics["prob_diff_max"], torch.tensor([0.3, 0.1, 0.04, -0.3, -0.1, -0.3], **F64)
    )


def test_probabilities_not_ratios():
    """The rare token (ratio 5) keeps its gradient where PPO's clip (0.2) drops it; with
    delta 0.1 a likely token 0.8 -> 0.95 (ratio 1.19, inside PPO's range) is masked."""
    t = row_tokens()
    g_ppo = torch.autograd.grad(build_algorithm("grpo", {}).token_loss(t)[0].sum(), t.logp)[0]
    g_dppo = torch.autograd.grad(build_algorithm("dppo", {}).token_loss(t)[0].sum(), t.logp)[0]
    assert g_ppo[2] == 0
    torch.testing.assert_close(g_dppo[2], torch.tensor(-5.0, **F64))
    likely = tokens([math.log(0.95)], [math.log(0.8)], [1.0])
    likely.logp.requires_grad_(True)
    tight = build_algorithm("dppo", {"delta_low": 0.1, "delta_high": 0.1})
    assert torch.autograd.grad(tight.token_loss(likely)[0].sum(), likely.logp)[0] == 0
    assert torch.autograd.grad(build_algorithm("grpo", {}).token_loss(likely)[0].sum(), likely.logp)[0] != 0


def test_separate_bounds():
    """delta_high 0.35 keeps the rise of 0.3, delta_low 0.2 still masks the fall of 0.3."""
    _, metrics = build_algorithm("dppo", {"delta_high": 0.35}).token_loss(row_tokens())
    assert metrics["clip_frac_high"].sum() == 0 and metrics["clip_frac_low"].tolist() == [0, 0, 0, 1.0, 0, 0]


@pytest.mark.parametrize("loss_agg", ["token-mean", "balanced"])
@pytest.mark.parametrize("num_ranks, max_tokens, max_seqs", SPLITS)
def test_same_loss_and_gradient_under_any_split(loss_agg, num_ranks, max_tokens, max_seqs):
    samples, logp = make_batch(seed=7, scale=0.5)
    algo = build_algorithm("dppo", {"delta_low": 0.05, "delta_high": 0.05, "loss_agg": loss_agg})
    assert_split_invariant(algo, samples, logp, num_ranks, max_tokens, max_seqs)
