"""SFT's per-token losses (docs/algorithms.md section 3): NLL, DFT and ASFT, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import TokenTensors, build_algorithm
from rlpost.algorithms.base import TOKEN_KL
from rlpost.errors import ConfigError
from rlpost.model.token_ops import chunked_logprobs, chunked_token_kl


def tokens(logp: torch.Tensor, **extra) -> TokenTensors:
    n = logp.shape[0]
    return TokenTensors(
        logp=logp,
        old_logp=None,
        advantages=None,
        entropy=torch.zeros(n),
        ref_logp=None,
        seq_index=torch.zeros(n, dtype=torch.long),
        extra=extra,
    )


def test_nll_is_unchanged_and_the_default():
    algo = build_algorithm("sft", {})
    assert not algo.needs.reference
    logp = torch.tensor([-0.1, -2.0])
    loss, metrics = algo.token_loss(tokens(logp))
    torch.testing.assert_close(loss, torch.tensor([0.1, 2.0]))
    assert set(metrics) == {"nll"}


def test_dft_by_hand():
    logp = torch.tensor([-0.1, -2.0], requires_grad=True)
    loss, metrics = build_algorithm("sft", {"loss": "dft"}).token_loss(tokens(logp))
    want = [-math.exp(v) * v for v in (-0.1, -2.0)]  # -p log p: 0.0905, 0.2707
    torch.testing.assert_close(loss, torch.tensor(want))
    torch.testing.assert_close(metrics["nll"], torch.tensor([0.1, 2.0]))
    loss.sum().backward()  # sg(p): d/dlogp = -p, not -p (1 + log p)
    torch.testing.assert_close(logp.grad, torch.tensor([-math.exp(-0.1), -math.exp(-2.0)]))


def test_asft_through_the_chunked_kl_equals_full_logits():
    """The learner's path: chunked logp and KL -> token_loss -> sum(weight * loss); its
    gradient equals the naive full-vocabulary computation of
    sum_t w_t (-sg(p_t) log p_t + lambda KL(pi_ref || pi_theta)_t)."""
    torch.manual_seed(0)
    n, h, v, lam = 30, 8, 57, 0.05
    head, ref_head = torch.nn.Linear(h, v), torch.nn.Linear(h, v).requires_grad_(False)
    hidden, ref_hidden = torch.randn(n, h, requires_grad=True), torch.randn(n, h)
    targets = torch.randint(0, v, (n,))
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    algo = build_algorithm("sft", {"loss": "asft", "asft_lambda": lam})
    assert algo.needs.reference

    logp, _, kl = chunked_token_kl(hidden, head, ref_hidden, ref_head, targets, chunk_size=7)
    loss, metrics = algo.token_loss(tokens(logp, **{TOKEN_KL: kl}))
    total = (loss.double() * weights).sum()
    total.backward()
    got = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    hidden.grad = None
    head.zero_grad()

    log_p = head(hidden).log_softmax(-1)
    log_r = ref_head(ref_hidden).log_softmax(-1)
    want = 0.0
    for t in range(n):
        lp = log_p[t, targets[t]]
        kl_t = (log_r[t].exp() * (log_r[t] - log_p[t])).sum()
        want = want + (-lp.detach().exp() * lp + lam * kl_t) / n
    want.backward()
    torch.testing.assert_close(total.float(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, (hidden.grad, head.weight.grad, head.bias.grad), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kl"], kl.detach())


def test_asft_with_lambda_zero_is_dft():
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 11)
    hidden, targets = torch.randn(5, 4), torch.randint(0, 11, (5,))
    logp, _, kl = chunked_token_kl(hidden, head, torch.randn(5, 4), head, targets, 2)
    asft_lambda_0 = build_algorithm("sft", {"loss": "asft", "asft_lambda": 0.0})
    asft, _ = asft_lambda_0.token_loss(tokens(logp, **{TOKEN_KL: kl}))
    dft_logp = chunked_logprobs(hidden, head, targets)[0]
    dft, _ = build_algorithm("sft", {"loss": "dft"}).token_loss(tokens(dft_logp))
    assert kl.abs().min() > 0
    torch.testing.assert_close(asft, dft)


def test_asft_without_the_kl_says_what_is_missing():
    with pytest.raises(KeyError, match="needs the per-token KL"):
        build_algorithm("sft", {"loss": "asft"}).token_loss(tokens(torch.tensor([-1.0])))


def test_config_errors():
    with pytest.raises(ConfigError, match="asft_lambda is set but algorithm.loss is 'dft'"):
        build_algorithm("sft", {"loss": "dft", "asft_lambda": 0.1})
    with pytest.raises(ConfigError, match="key 'algorithm.loss'"):
        build_algorithm("sft", {"loss": "kl"})
