"""Log-probs and entropies of chosen tokens, computed chunk by chunk.

The output head is applied to at most `chunk_size` hidden states at a time,
and no [tokens x vocab] tensor is ever kept: the forward pass saves only the
hidden states, log-normalisers and entropies, and the backward pass recomputes
each chunk's logits to form its gradient in place. Peak memory is about two
[chunk x vocab] fp32 tensors plus an fp32 gradient buffer of the head.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Temperature = float | torch.Tensor  # one for all tokens, or one per token [N]


def _rows(temperature: Temperature, s: int, e: int) -> Temperature:
    """Temperature of tokens s:e, shaped to divide their [rows x vocab] logits."""
    return temperature[s:e, None] if isinstance(temperature, torch.Tensor) else temperature


def _scaled(logits: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    """fp32 logits / temperature. Inside the compiled chunk kernels, so that the upcast of
    the head's bf16 output is fused into their first read instead of being a pass of its own."""
    z = logits.float()
    return z if isinstance(temperature, float) and temperature == 1.0 else z / temperature


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in fp32 without rounding each chunk's product to bf16 first."""
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_((a @ b).float())


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: Temperature):
    """Log-prob of the target, entropy and log-normaliser of each row of a chunk's
    distribution at `temperature` (fp32)."""
    z = _scaled(logits, temperature)
    lz = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lz
    log_q = z.sub_(lz[:, None])
    return logp, -(log_q.exp() * log_q).sum(-1), lz


def _chunk_grad(
    logits: torch.Tensor,
    lz,
    entropy,
    targets,
    grad_logp,
    grad_entropy,
    temperature: Temperature,
    dtype: torch.dtype,
) -> torch.Tensor:
    """d loss / d (pre-temperature) logits of a chunk, in `dtype`.

    d logp_y / dz = onehot(y) - p;  d H / dz = -p * (log p + H);  z = logits / temperature."""
    log_q = _scaled(logits, temperature).sub_(lz[:, None])
    g = log_q.add(entropy[:, None]).mul_(grad_entropy[:, None]).add_(grad_logp[:, None])
    g = g.mul_(log_q.exp_()).neg_()
    g.scatter_add_(-1, targets[:, None], grad_logp[:, None])
    return g.div_(temperature).to(dtype)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _kernel(device: torch.device, fn):
    # On CUDA the elementwise passes over each [chunk x vocab] tensor are fused into a
    # few kernels; elsewhere (and for tests) they run eagerly.
    return _compiled(fn) if device.type == "cuda" else fn


def _head_backward(ctx, hidden, weight, bias, chunk_grad) -> tuple:
    """Gradients of the hidden states, head weight and head bias (each None unless
    needed), chunk by chunk: `chunk_grad(s, e, h, t)` recomputes the gradient with respect
    to the logits of tokens s:e from their hidden states h and temperatures t."""
    want_h, want_w, want_b = ctx.needs_input_grad[:3]
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
    for s in range(0, hidden.shape[0], ctx.chunk_size):
        e = s + ctx.chunk_size
        h = hidden[s:e]
        g = chunk_grad(s, e, h, _rows(ctx.temperature, s, e))
        if want_h:
            grad_h[s:e] = g @ weight
        if want_w:
            _accumulate(grad_w, g.t(), h)
        if want_b:
            grad_b.add_(g.float().sum(0))
    return (grad_h, grad_w.to(weight.dtype) if want_w else None, grad_b.to(bias.dtype) if want_b else None)


class _ChunkedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: Temperature, chunk_size: int):
        n = hidden.shape[0]
        stats = _kernel(hidden.device, _chunk_stats)
        logp, entropy, log_z = (hidden.new_empty(n, dtype=torch.float32) for _ in range(3))
        for s in range(0, n, chunk_size):
            e = s + chunk_size
            logp[s:e], entropy[s:e], log_z[s:e] = stats(
                nn.functional.linear(hidden[s:e], weight, bias), targets[s:e], _rows(temperature, s, e)
            )
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        grad_of = _kernel(hidden.device, _chunk_grad)
        zeros = torch.zeros_like(log_z)
        grad_logp = zeros if grad_logp is None else grad_logp.float()
        grad_entropy = zeros if grad_entropy is None else grad_entropy.float()

        def chunk_grad(s, e, h, t):
            return grad_of(
                nn.functional.linear(h, weight, bias),
                log_z[s:e],
                entropy[s:e],
                targets[s:e],
                grad_logp[s:e],
                grad_entropy[s:e],
                t,
                weight.dtype,
            )

        return (*_head_backward(ctx, hidden, weight, bias, chunk_grad), None, None, None)


def _checkpointed_chunk(head: nn.Module, hidden, targets, temperature: Temperature):
    logits = head(hidden).float() / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def chunked_logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    temperature: Temperature = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H] (the states that predict each target), targets [N] -> logp [N], entropy [N],
    of the distribution softmax(logits / temperature) (a float, or a tensor [N] per token)."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    if not hasattr(head.weight, "ds_id"):
        return _ChunkedLogProb.apply(hidden, head.weight, head.bias, targets, temperature, chunk_size)
    # ZeRO-3 partitions the head: it must be called as a module so DeepSpeed gathers
    # it, so each chunk goes through activation checkpointing instead.
    outs = [
        checkpoint(
            _checkpointed_chunk,
            head,
            hidden[s : s + chunk_size],
            targets[s : s + chunk_size],
            _rows(temperature, s, s + chunk_size),
            use_reentrant=False,
        )
        for s in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


@torch.no_grad()
def chunked_collision(
    hidden: torch.Tensor, head: nn.Module, chunk_size: int = 1024, temperature: Temperature = 1.0
) -> torch.Tensor:
    """sum_v pi(v)^2 [N] of softmax(head(hidden) / temperature), chunk by chunk (no gradient:
    the optimal token baseline reads it from the old policy). Called as a module, so ZeRO-3
    gathers a partitioned head."""
    out = []
    for s in range(0, hidden.shape[0], chunk_size):
        z = _scaled(head(hidden[s : s + chunk_size]), _rows(temperature, s, s + chunk_size))
        out.append((2 * torch.log_softmax(z, -1)).exp().sum(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


# ----- full-vocabulary KL(pi_ref || pi_theta) per token ---------------------------------
# TDPO, SparsePO and ASFT need sum_v r_v (log r_v - log p_v) at every response token, with r
# the frozen reference's distribution and p the policy's. Like the log-probs above, it is
# computed chunk by chunk: the forward pass keeps, per token, only the two log-normalisers;
# the backward pass recomputes both chunks of logits (reference included: it has no
# gradient, but p - r needs r) and forms the gradient in place.


def _kl_chunk_stats(
    logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor, temperature: Temperature
):
    """Policy and reference log-probs of the targets, KL(r || p) and both log-normalisers of
    a chunk's rows of policy and reference logits, both at `temperature` (fp32)."""
    z, zr = _scaled(logits, temperature), _scaled(ref_logits, temperature)
    lz, lzr = torch.logsumexp(z, dim=-1), torch.logsumexp(zr, dim=-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lz
    ref_logp = zr.gather(-1, targets[:, None]).squeeze(-1) - lzr
    log_r = zr.sub_(lzr[:, None])
    log_ratio = z.sub_(lz[:, None]).neg_().add_(log_r)  # log r - log p, in z's storage
    kl = (log_r.exp_() * log_ratio).sum(-1)
    return logp, ref_logp, kl, lz, lzr


def _kl_chunk_grad(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    lz,
    lzr,
    targets,
    grad_logp,
    grad_kl,
    temperature: Temperature,
    dtype: torch.dtype,
) -> torch.Tensor:
    """d loss / d (pre-temperature) policy logits of a chunk, in `dtype`.

    d KL(r || p) / dz = p - r;  d logp_y / dz = onehot(y) - p;  z = logits / temperature."""
    p = _scaled(logits, temperature).sub_(lz[:, None]).exp_()
    r = _scaled(ref_logits, temperature).sub_(lzr[:, None]).exp_()
    g = p.mul_((grad_kl - grad_logp)[:, None]).sub_(r.mul_(grad_kl[:, None]))
    g.scatter_add_(-1, targets[:, None], grad_logp[:, None])
    return g.div_(temperature).to(dtype)


class _ChunkedTokenKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        targets,
        temperature: Temperature,
        chunk_size: int,
    ):
        n = hidden.shape[0]
        stats = _kernel(hidden.device, _kl_chunk_stats)
        logp, ref_logp, kl, log_z, ref_log_z = (hidden.new_empty(n, dtype=torch.float32) for _ in range(5))
        for s in range(0, n, chunk_size):
            e, t = s + chunk_size, _rows(temperature, s, s + chunk_size)
            logp[s:e], ref_logp[s:e], kl[s:e], log_z[s:e], ref_log_z[s:e] = stats(
                nn.functional.linear(hidden[s:e], weight, bias),
                nn.functional.linear(ref_hidden[s:e], ref_weight, ref_bias),
                targets[s:e],
                t,
            )
        ctx.save_for_backward(
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, log_z, ref_log_z
        )
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(ref_logp)
        return logp, ref_logp, kl

    @staticmethod
    def backward(ctx, grad_logp, _grad_ref_logp, grad_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, log_z, ref_log_z = ctx.saved_tensors
        grad_of = _kernel(hidden.device, _kl_chunk_grad)
        zeros = torch.zeros_like(log_z)
        grad_logp = zeros if grad_logp is None else grad_logp.float()
        grad_kl = zeros if grad_kl is None else grad_kl.float()

        def chunk_grad(s, e, h, t):
            return grad_of(
                nn.functional.linear(h, weight, bias),
                nn.functional.linear(ref_hidden[s:e], ref_weight, ref_bias),
                log_z[s:e],
                ref_log_z[s:e],
                targets[s:e],
                grad_logp[s:e],
                grad_kl[s:e],
                t,
                weight.dtype,
            )

        return (*_head_backward(ctx, hidden, weight, bias, chunk_grad), None, None, None, None, None, None)


def _checkpointed_kl_chunk(
    head: nn.Module, hidden, ref_head: nn.Module, ref_hidden, targets, temperature: Temperature
):
    log_p = (head(hidden).float() / temperature).log_softmax(-1)
    with torch.no_grad():
        log_r = (ref_head(ref_hidden).float() / temperature).log_softmax(-1)
    kl = (log_r.exp() * (log_r - log_p)).sum(-1)
    return (
        log_p.gather(-1, targets[:, None]).squeeze(-1),
        log_r.gather(-1, targets[:, None]).squeeze(-1),
        kl,
    )


def chunked_token_kl(
    hidden: torch.Tensor,
    head: nn.Module,
    ref_hidden: torch.Tensor,
    ref_head: nn.Module,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    temperature: Temperature = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token of `targets` [N]: the policy's log-prob logp [N], the reference's ref_logp [N]
    (no gradient) and KL(pi_ref(.|s_t) || pi_theta(.|s_t)) [N] over the full vocabulary,
    both distributions taken at `temperature` (a float, or a tensor [N] per token).

    `hidden` [N, H] and `ref_hidden` [N, H_ref] are the policy's and the reference's final
    states predicting each target; gradients reach `hidden` and the policy head only.
    One pass gives all three because each needs the same two chunks of logits.

    Memory: per chunk the forward holds two fp32 [chunk x V] logit tensors (plus one
    temporary of that size); between forward and backward only O(N) floats are kept
    besides the inputs; the backward recomputes both chunks and holds about three
    [chunk x V] tensors plus the fp32 gradient buffer of the head. Under ZeRO-3 each chunk
    runs through activation checkpointing instead, which likewise keeps only its inputs.
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty
    if not hasattr(head.weight, "ds_id"):
        return _ChunkedTokenKL.apply(
            hidden,
            head.weight,
            head.bias,
            ref_hidden,
            ref_head.weight,
            ref_head.bias,
            targets,
            temperature,
            chunk_size,
        )
    # ZeRO-3 partitions the policy head: it must be called as a module (see chunked_logprobs)
    outs = [
        checkpoint(
            _checkpointed_kl_chunk,
            head,
            hidden[s : s + chunk_size],
            ref_head,
            ref_hidden[s : s + chunk_size],
            targets[s : s + chunk_size],
            _rows(temperature, s, s + chunk_size),
            use_reentrant=False,
        )
        for s in range(0, hidden.shape[0], chunk_size)
    ]
    return tuple(torch.cat([o[i] for o in outs]) for i in range(3))


def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU through numpy (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
