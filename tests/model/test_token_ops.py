"""Chunked log-probs / entropy equal the naive full-logits computation, values and gradients."""

from __future__ import annotations

import pytest
import torch

from rlpost.model.token_ops import chunked_logprobs


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7, "per_token"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("zero3", [False, True])
def test_chunked_matches_naive(chunk, temperature, bias, zero3):
    torch.manual_seed(0)
    n, h, v = 50, 16, 97
    head = torch.nn.Linear(h, v, bias=bias)
    if zero3:
        head.weight.ds_id = 0  # what DeepSpeed marks ZeRO-3 partitioned parameters with
    hidden = torch.randn(n, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    weights = torch.randn(n)
    if temperature == "per_token":  # HAPO's adaptive temperature: one T_t per token
        temperature = torch.rand(n) + 0.5

    logp, ent = chunked_logprobs(hidden, head, targets, chunk_size=chunk, temperature=temperature)
    ((logp * weights).sum() + ent.sum()).backward()
    got = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    head.zero_grad()
    hidden.grad = None

    logits = head(hidden) / (temperature[:, None] if isinstance(temperature, torch.Tensor) else temperature)
    full = logits.log_softmax(-1)
    ref_logp = full.gather(-1, targets[:, None]).squeeze(-1)
    ref_ent = -(full.exp() * full).sum(-1)
    ((ref_logp * weights).sum() + ref_ent.sum()).backward()

    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], head.weight.grad, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(got[2], head.bias.grad, rtol=1e-5, atol=1e-6)


def test_gradient_through_log_probs_only():
    """Entropy as a metric (no gradient through it), as in the clipped RL loss."""
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 33, bias=False)
    hidden = torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(0, 33, (20,))
    logp, _ = chunked_logprobs(hidden, head, targets, chunk_size=6)
    logp.sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    head(hidden).log_softmax(-1).gather(-1, targets[:, None]).sum().backward()
    torch.testing.assert_close(got, hidden.grad, rtol=1e-5, atol=1e-6)


def test_entropy_of_uniform_is_log_vocab():
    head = torch.nn.Linear(4, 10, bias=False)
    torch.nn.init.zeros_(head.weight)
    logp, ent = chunked_logprobs(torch.randn(3, 4), head, torch.tensor([0, 1, 2]), chunk_size=2)
    torch.testing.assert_close(ent, torch.full((3,), torch.log(torch.tensor(10.0)).item()))
    torch.testing.assert_close(logp, torch.full((3,), -torch.log(torch.tensor(10.0)).item()))
