"""Clip-Cov and KL-Cov (docs/algorithms.md section 6, `clip_cov` / `kl_cov`): the token
covariance centred over the whole mini-batch and what each selects from it, by hand; the
losses and gradients; the random pick fixed by the mini-batch and `pick_seed`; every key
checked; and the same loss and gradient under any split (the selection made once, before)."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import ALGORITHMS, build_algorithm
from rlpost.algorithms.covariance import KL_COV_SELECTED, ClipCov, KLCov, token_covariance
from rlpost.data.batch import Sample, view
from rlpost.errors import ConfigError
from tests.algorithms.split_check import (
    SPLITS,
    assert_split_invariant,
    make_batch,
    weighted,
    whole_loss_and_grad,
)

F64 = dict(dtype=torch.float64)
# response 0 (A = 1): old log-probs -1, -2, -3; response 1 (A = -1): -0.5, -4.
# mean log pi = -2.1, mean A = 0.2: Cov = 1.1 * 0.8, 0.1 * 0.8, -0.9 * 0.8, 1.6 * -1.2, -1.9 * -1.2
COV = [0.88, 0.08, -0.72, -1.92, 2.28]
SHIFT = [0.1, -0.2, 0.3, 0.2, -0.1]  # log r of each token


def hand_batch():
    olds = [torch.tensor([-1.0, -2.0, -3.0], **F64), torch.tensor([-0.5, -4.0], **F64)]
    samples = [
        Sample(
            prompt_ids=[1],
            response_ids=[2] * len(o),
            group=0,
            advantages=torch.full((len(o),), a, **F64),
            old_logp=o,
        )
        for o, a in zip(olds, [1.0, -1.0])
    ]
    logp = (torch.cat(olds) + torch.tensor(SHIFT, **F64)).requires_grad_(True)
    return samples, logp


def test_registry_defaults_and_keys():
    clip, kl = build_algorithm("clip_cov", {}), build_algorithm("kl_cov", {})
    assert (ALGORITHMS["clip_cov"], ALGORITHMS["kl_cov"]) == (ClipCov, KLCov)
    assert (clip.cfg.pick_frac, clip.cfg.cov_low, clip.cfg.cov_high, clip.cfg.pick_seed) == (
        2e-4,
        1.0,
        5.0,
        0,
    )
    assert (kl.cfg.top_frac, kl.cfg.beta, kl.cfg.loss_agg) == (2e-3, 1.0, "token-mean")
    assert clip.needs.old_policy_entropy and kl.needs.old_policy_entropy  # old log-probs first
    for name, key, value in [
        ("clip_cov", "pick_frac", 0.0),
        ("clip_cov", "pick_frac", 2.0),
        ("clip_cov", "pick_seed", -1),
        ("kl_cov", "top_frac", 0.0),
        ("clip_cov", "cov_low", "low"),
        ("clip_cov", "cov_high", None),
        ("clip_cov", "loss_agg", "constant"),
        ("kl_cov", "beta", -1.0),
        ("kl_cov", "top_frac", 1.5),
        ("kl_cov", "advantage", "gae"),
    ]:
        with pytest.raises(ConfigError, match=f"key 'algorithm.{key}'"):
            build_algorithm(name, {key: value})
    with pytest.raises(ConfigError, match=r"algorithm.cov_low \(5.0\) must be below algorithm.cov_high"):
        build_algorithm("clip_cov", {"cov_low": 5.0})
    with pytest.raises(ConfigError, match="unknown key 'algorithm.top_frac'"):
        build_algorithm("clip_cov", {"top_frac": 0.1})


def test_covariance_is_centred_over_the_whole_minibatch():
    samples, _ = hand_batch()
    torch.testing.assert_close(token_covariance(view(samples), "kl_cov"), torch.tensor(COV, **F64))
    # a masked token leaves the means (and has Cov 0): without token 2, mean log pi = -1.875,
    # mean A = 0
    for s, m in zip(samples, [[True, True, False], [True, True]]):
        s.extra["token_mask"] = torch.tensor(m)
    want = [0.875 * 1, -0.125 * 1, 0.0, 1.375 * -1, -2.125 * -1]
    torch.testing.assert_close(token_covariance(view(samples), "kl_cov"), torch.tensor(want, **F64))
    samples[0].old_logp = None
    with pytest.raises(ValueError, match="old policy's log-probs"):
        token_covariance(view(samples), "kl_cov")


def test_kl_cov_by_hand():
    """top_frac 0.4 of 5 tokens: the 2 of largest Cov, tokens 4 (2.28) and 0 (0.88), take
    -A r + |log r|; the others -A r. Token-mean: each gradient / 5."""
    algo = build_algorithm("kl_cov", {"top_frac": 0.4})
    samples, logp = hand_batch()
    weighted(algo, samples)
    assert torch.cat([s.extra[KL_COV_SELECTED] for s in samples]).tolist() == [1.0, 0, 0, 0, 1.0]
    loss, grad = whole_loss_and_grad(algo, samples, logp)
    e = math.exp
    per_token = [-e(0.1) + 0.1, -e(-0.2), -e(0.3), e(0.2), e(-0.1) + 0.1]
    torch.testing.assert_close(loss, torch.tensor(sum(per_token) / 5, **F64))
    want_grad = [-e(0.1) + 1, -e(-0.2), -e(0.3), e(0.2), e(-0.1) - 1]
    torch.testing.assert_close(grad, torch.tensor(want_grad, **F64) / 5)
    # beta scales the term; beta 0 is the plain -A r
    _, grad0 = whole_loss_and_grad(build_algorithm("kl_cov", {"top_frac": 0.4, "beta": 0.0}), samples, logp)
    torch.testing.assert_close(grad0, torch.tensor([-e(0.1), -e(-0.2), -e(0.3), e(0.2), e(-0.1)], **F64) / 5)


def test_clip_cov_by_hand():
    """Candidates 0.5 < Cov < 5: tokens 0 and 4; pick_frac 0.2 of 5: one of them loses its
    gradient (weight 0) and stays in the normaliser (the others keep 1/5)."""
    samples, logp = hand_batch()
    picks = set()
    for seed in range(8):
        algo = build_algorithm("clip_cov", {"pick_frac": 0.2, "cov_low": 0.5, "pick_seed": seed})
        weights = algo.token_weights(view(samples))
        assert (weights == 0).sum() == 1 and set(weights[weights > 0].tolist()) == {0.2}
        picked = int((weights == 0).nonzero())
        picks.add(picked)
        assert torch.equal(algo.token_weights(view(samples)), weights)  # the same batch, the same pick
        _, grad = whole_loss_and_grad(algo, samples, logp)
        r = torch.tensor(SHIFT, **F64).exp() * torch.tensor([1.0, 1, 1, -1, -1], **F64)
        want = -r / 5
        want[picked] = 0.0
        torch.testing.assert_close(grad, want)
        metrics = algo.weight_metrics(view(samples), weights)
        assert metrics == {"cov/picked_frac": 0.2, "cov/candidate_frac": 0.4}
    assert picks == {0, 4}  # the pick is random among the candidates, by pick_seed
    # with the default range (1, 5) only token 4 is a candidate; 2e-4 of 5 tokens rounds to 0
    default = build_algorithm("clip_cov", {"pick_frac": 0.5})
    assert (default.token_weights(view(samples)) == 0).tolist() == [False, False, False, False, True]
    assert (build_algorithm("clip_cov", {}).token_weights(view(samples)) > 0).all()


@pytest.mark.parametrize(
    "name, params", [("clip_cov", {"pick_frac": 0.1, "cov_low": 0.0}), ("kl_cov", {"top_frac": 0.1})]
)
@pytest.mark.parametrize("num_ranks, max_tokens, max_seqs", SPLITS)
def test_same_loss_and_gradient_under_any_split(name, params, num_ranks, max_tokens, max_seqs):
    samples, logp = make_batch(seed=8, scale=0.5, token_advantages=True)
    algo = build_algorithm(name, {**params, "loss_agg": "seq-mean-token-mean"})
    weighted(algo, samples)
    selected = sum(int((s.weights == 0).sum()) for s in samples) if name == "clip_cov" else None
    assert selected is None or selected == 4  # round(0.1 * 36) tokens picked
    assert_split_invariant(algo, samples, logp, num_ranks, max_tokens, max_seqs)
