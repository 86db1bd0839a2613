"""GRPO's pieces against hand-computed numbers (docs/algorithms.md section 1)."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import TokenTensors, build_algorithm
from rlpost.algorithms.aggregation import seq_mean_token_mean, token_mean
from rlpost.algorithms.grpo import kl_penalty
from rlpost.data.batch import Sample, view


def _tokens(logp, old, adv):
    t = torch.tensor
    return TokenTensors(
        logp=t(logp),
        old_logp=t(old),
        advantages=t(adv),
        entropy=torch.zeros(len(logp)),
        ref_logp=None,
        seq_index=torch.zeros(len(logp), dtype=torch.long),
    )


def test_ppo_clip_per_token_numbers():
    algo = build_algorithm("grpo", {"clip_eps_low": 0.2, "clip_eps_high": 0.28})
    # ratios 1.5, 0.5, 1.1, 0.7 (log-space inputs)
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7])
    adv = [2.0, -1.0, 1.0, 3.0]
    loss, m = algo.token_loss(_tokens(ratio.log().tolist(), [0.0] * 4, adv))
    # A>0, rho=1.5 > 1.28: clipped -> -2*1.28; A<0, rho=0.5 < 0.8: clipped -> 1*0.8;
    # inside: -1*1.1; A>0 with rho=0.7 below the range: unclipped (min objective) -> -3*0.7
    torch.testing.assert_close(loss, torch.tensor([-2.56, 0.8, -1.1, -2.1]))
    torch.testing.assert_close(m["clip_frac_high"], torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(m["clip_frac_low"], torch.tensor([0, 1.0, 0, 0]))


def test_dual_clip_caps_negative_advantage_loss():
    algo = build_algorithm("grpo", {"dual_clip": 3.0})
    loss, _ = algo.token_loss(_tokens([math.log(5.0), math.log(2.0)], [0.0, 0.0], [-1.0, -1.0]))
    # rho=5: max(5, 1.2) = 5, capped at 3; rho=2: 2 stays
    torch.testing.assert_close(loss, torch.tensor([3.0, 2.0]))


def test_kl_estimators_numbers():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log x = -0.5
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)


def test_kl_term_added_with_coefficient():
    algo = build_algorithm("grpo", {"kl_coef": 0.04})
    assert algo.needs.reference
    t = _tokens([-1.0], [-1.0], [0.0])
    t.ref_logp = torch.tensor([-1.5])
    loss, m = algo.token_loss(t)
    assert loss.item() == pytest.approx(0.04 * (math.exp(-0.5) + 0.5 - 1))


def _view(lengths):
    return view([Sample(prompt_ids=[1], response_ids=[3] * n, advantages=torch.zeros(n)) for n in lengths])


def test_aggregation_weights_numbers():
    b = _view([1, 3, 4])
    torch.testing.assert_close(token_mean(b), torch.full((8,), 1 / 8, dtype=torch.float64))
    # each sequence weighs 1/3, spread over its own tokens
    expected = torch.tensor([1 / 3] + [1 / 9] * 3 + [1 / 12] * 4, dtype=torch.float64)
    torch.testing.assert_close(seq_mean_token_mean(b), expected)
    assert seq_mean_token_mean(b).sum().item() == pytest.approx(1.0)


def test_unknown_algorithm_key_is_named():
    from rlpost.errors import ConfigError

    with pytest.raises(ConfigError, match="algorithm.clip_eps"):
        build_algorithm("grpo", {"clip_eps": 0.2})
