"""Chunked full-vocabulary KL(pi_ref || pi_theta) per token: values and gradients equal the
naive full-logits computation, and nothing of size [tokens x vocab] survives the forward."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.model.token_ops import chunked_token_kl


def naive(hidden, head, ref_hidden, ref_head, targets, temperature):
    t = temperature[:, None] if isinstance(temperature, torch.Tensor) else temperature
    log_p = (head(hidden) / t).log_softmax(-1)
    with torch.no_grad():
        log_r = (ref_head(ref_hidden) / t).log_softmax(-1)
    kl = (log_r.exp() * (log_r - log_p)).sum(-1)
    pick = lambda x: x.gather(-1, targets[:, None]).squeeze(-1)  # noqa: E731
    return pick(log_p), pick(log_r), kl


def setup(n, h, v, bias, seed=0, ref_h=None):
    torch.manual_seed(seed)
    head = torch.nn.Linear(h, v, bias=bias)
    ref_head = torch.nn.Linear(ref_h or h, v, bias=bias).requires_grad_(False)
    hidden = torch.randn(n, h, requires_grad=True)
    ref_hidden = torch.randn(n, ref_h or h)
    targets = torch.randint(0, v, (n,))
    return head, ref_head, hidden, ref_hidden, targets


def grads(hidden, head):
    out = [hidden.grad.clone(), head.weight.grad.clone()]
    if head.bias is not None:
        out.append(head.bias.grad.clone())
    head.zero_grad()
    hidden.grad = None
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7, "per_token"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("zero3", [False, True])
def test_chunked_kl_matches_naive(chunk, temperature, bias, zero3):
    n, v = 50, 97
    head, ref_head, hidden, ref_hidden, targets = setup(n, 16, v, bias, ref_h=12)
    if zero3:
        head.weight.ds_id = 0  # what DeepSpeed marks ZeRO-3 partitioned parameters with
    if temperature == "per_token":
        temperature = torch.rand(n) + 0.5
    w_logp, w_kl = torch.randn(n), torch.randn(n)

    logp, ref_logp, kl = chunked_token_kl(hidden, head, ref_hidden, ref_head, targets, chunk, temperature)
    ((logp * w_logp).sum() + (kl * w_kl).sum()).backward()
    got = grads(hidden, head)
    want_logp, want_ref, want_kl = naive(hidden, head, ref_hidden, ref_head, targets, temperature)
    ((want_logp * w_logp).sum() + (want_kl * w_kl).sum()).backward()

    torch.testing.assert_close(logp, want_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref_logp, want_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl, want_kl, rtol=1e-5, atol=1e-6)
    assert not ref_logp.requires_grad
    for g, w in zip(got, grads(hidden, head)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_kl_gradient_is_p_minus_r():
    """d KL(r || p) / d logits = (p - r) / T, checked on the logits themselves (identity head)."""
    torch.manual_seed(3)
    v, temperature = 6, 0.5
    head = torch.nn.Linear(v, v, bias=False)
    ref_head = torch.nn.Linear(v, v, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(v))
        ref_head.weight.copy_(torch.eye(v))
    z = torch.randn(4, v, requires_grad=True)
    zr = torch.randn(4, v)
    _, _, kl = chunked_token_kl(z, head, zr, ref_head, torch.zeros(4, dtype=torch.long), 3, temperature)
    kl.sum().backward()
    p, r = (z.detach() / temperature).softmax(-1), (zr / temperature).softmax(-1)
    torch.testing.assert_close(z.grad, (p - r) / temperature, rtol=1e-5, atol=1e-7)


def test_kl_by_hand():
    """Two tokens, vocabulary 2: KL from the definition with the math module."""
    head = torch.nn.Linear(1, 2, bias=True)
    ref_head = torch.nn.Linear(1, 2, bias=True).requires_grad_(False)
    with torch.no_grad():
        head.weight.zero_()
        ref_head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0]))  # p = softmax([0, 1])
        ref_head.bias.copy_(torch.tensor([2.0, 0.0]))  # r = softmax([2, 0])
    logp, ref_logp, kl = chunked_token_kl(
        torch.zeros(2, 1), head, torch.zeros(2, 1), ref_head, torch.tensor([0, 1]), chunk_size=1
    )
    p1 = math.e / (1 + math.e)
    r0 = math.exp(2) / (math.exp(2) + 1)
    p, r = [1 - p1, p1], [r0, 1 - r0]
    want_kl = sum(r[i] * math.log(r[i] / p[i]) for i in range(2))
    torch.testing.assert_close(kl, torch.tensor([want_kl] * 2))
    torch.testing.assert_close(logp, torch.tensor([math.log(p[0]), math.log(p[1])]))
    torch.testing.assert_close(ref_logp, torch.tensor([math.log(r[0]), math.log(r[1])]))


def test_kl_of_identical_models_is_zero_with_zero_gradient():
    head, _, hidden, _, targets = setup(10, 8, 33, True)
    _, _, kl = chunked_token_kl(hidden, head, hidden.detach(), head, targets, 4)
    kl.sum().backward()
    torch.testing.assert_close(kl, torch.zeros(10), atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden.grad, torch.zeros_like(hidden), atol=1e-6, rtol=0)


@pytest.mark.parametrize("zero3", [False, True])
def test_nothing_of_tokens_x_vocab_is_kept_for_backward(zero3):
    """Every tensor autograd keeps between forward and backward is an input or O(N): no
    [N x V] nor [chunk x V] logits (N, chunk > hidden size, so the heads [V x H] are smaller)."""
    n, h, v, chunk = 64, 8, 101, 16
    head, ref_head, hidden, ref_hidden, targets = setup(n, h, v, True)
    if zero3:
        head.weight.ds_id = 0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        logp, _, kl = chunked_token_kl(hidden, head, ref_hidden, ref_head, targets, chunk)
    assert saved, "autograd saved nothing: the hook did not see the forward"
    assert max(saved) <= v * h < chunk * v
    (logp.sum() + kl.sum()).backward()  # the backward still works from what was kept
    assert hidden.grad is not None


def test_empty_input():
    head, ref_head, _, _, _ = setup(1, 4, 9, False)
    out = chunked_token_kl(
        torch.zeros(0, 4), head, torch.zeros(0, 4), ref_head, torch.zeros(0, dtype=torch.long)
    )
    assert [o.shape for o in out] == [torch.Size([0])] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_kernels_and_peak_memory():
    """On CUDA the chunk kernels are compiled: values and gradients equal fp32 full logits,
    and at a Qwen2.5-0.5B-sized head (V 151936) the peak stays a few chunks above the inputs."""
    head, ref_head, hidden, ref_hidden, targets = setup(300, 64, 1000, True)
    head, ref_head = head.cuda(), ref_head.cuda()
    hidden = hidden.detach().cuda().requires_grad_(True)
    ref_hidden, targets = ref_hidden.cuda(), targets.cuda()
    logp, _, kl = chunked_token_kl(hidden, head, ref_hidden, ref_head, targets, 128, 0.8)
    (logp.sum() + 0.3 * kl.sum()).backward()
    got = grads(hidden, head)
    want_logp, _, want_kl = naive(hidden, head, ref_hidden, ref_head, targets, 0.8)
    (want_logp.sum() + 0.3 * want_kl.sum()).backward()
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, want_kl, rtol=1e-4, atol=1e-5)
    for g, w in zip(got, grads(hidden, head)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

    n, h, v, chunk = 16384, 896, 151936, 1024
    torch.manual_seed(0)
    head = torch.nn.Linear(h, v, bias=False).cuda().bfloat16()
    ref_head = torch.nn.Linear(h, v, bias=False).cuda().bfloat16().requires_grad_(False)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref_hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    chunked_token_kl(hidden, head, ref_hidden, ref_head, targets, chunk)  # compile first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, _, kl = chunked_token_kl(hidden, head, ref_hidden, ref_head, targets, chunk)
    (logp.sum() + kl.sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    chunk_bytes = chunk * v * 4
    grad_bytes = hidden.numel() * 2 + v * h * (4 + 2)  # grad of hidden, fp32 head buffer + its bf16 copy
    print(
        f"peak above inputs {peak / 2**30:.2f} GiB; one fp32 [chunk x V] {chunk_bytes / 2**30:.2f} GiB; "
        f"full [N x V] fp32 {n * v * 4 / 2**30:.2f} GiB"
    )
    assert peak < grad_bytes + 5 * chunk_bytes
