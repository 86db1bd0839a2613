"""Helpers for the policy-loss tests of docs/algorithms.md section 6: a mini-batch of samples
with a leaf `logp`, its loss as the learners compute it (sum_t w_t l_t per micro-batch, the
weights over the whole mini-batch first), and the check that any split into micro-batches
and learner ranks (`data.batch.shard`) gives the same loss and gradient."""

from __future__ import annotations

import torch

from rlpost.algorithms import TokenTensors
from rlpost.algorithms.advantages import grpo
from rlpost.data.batch import Sample, shard, view

LENGTHS = [3, 7, 1, 5, 4, 2, 6, 8]  # two groups of four
GROUP = 4
SPLITS = [(1, None, 1), (1, 12, None), (2, None, 2), (2, 9, None), (4, None, None), (3, 5, 2)]


def make_batch(seed: int = 0, scale: float = 0.3, token_advantages: bool = False, lengths=LENGTHS):
    """Samples with GRPO advantages of random rewards (plus per-token noise when
    `token_advantages`), old log-probs in [-3, 0], and a leaf `logp` [T] whose log-ratios
    to them are a per-sequence shift and a per-token spread, both of order `scale`."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(len(lengths) // GROUP, GROUP, generator=g, dtype=torch.float64)
    adv = grpo(rewards).reshape(-1)
    samples, logps = [], []
    for i, n in enumerate(lengths):
        old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
        shift = (torch.rand((), generator=g, dtype=torch.float64) - 0.5) * 2 * scale
        logps.append(old + shift + torch.randn(n, generator=g, dtype=torch.float64) * scale)
        a = torch.full((n,), float(adv[i]), dtype=torch.float64)
        if token_advantages:
            a = a + torch.randn(n, generator=g, dtype=torch.float64)
        samples.append(
            Sample(prompt_ids=[1, 2], response_ids=[3] * n, group=i // GROUP, advantages=a, old_logp=old)
        )
    return samples, torch.cat(logps).requires_grad_(True)


def offsets(samples) -> dict[int, int]:
    starts = torch.tensor([0] + [s.num_tokens for s in samples]).cumsum(0)
    return {id(s): int(starts[i]) for i, s in enumerate(samples)}


def weighted(algo, samples):
    """Each sample's aggregation weights and the algorithm's mini-batch inputs (in its
    `extra`), over the whole mini-batch (before any split), as `jobs.update` sets them."""
    batch, sizes = view(samples), [s.num_tokens for s in samples]
    inputs = {k: v.split(sizes) for k, v in algo.minibatch_inputs(batch).items()}
    for i, (s, w) in enumerate(zip(samples, algo.token_weights(batch).split(sizes))):
        s.weights = w
        s.extra.update({k: v[i] for k, v in inputs.items()})
    return samples


def micro_loss(algo, micro, logp, start) -> torch.Tensor:
    """sum_t w_t l_t of one micro-batch, as a learner computes it (local seq_index)."""
    idx = torch.cat([torch.arange(start[id(s)], start[id(s)] + s.num_tokens) for s in micro])
    cat = lambda field: torch.cat([getattr(s, field) for s in micro])  # noqa: E731
    t = TokenTensors(
        logp=logp[idx],
        old_logp=cat("old_logp"),
        advantages=cat("advantages"),
        entropy=None,
        ref_logp=None,
        seq_index=torch.repeat_interleave(
            torch.arange(len(micro)), torch.tensor([s.num_tokens for s in micro])
        ),
        extra={k: torch.cat([s.extra[k] for s in micro]) for k in micro[0].extra},
    )
    loss, _ = algo.token_loss(t)
    return (cat("weights") * loss).sum()


def whole_loss_and_grad(algo, samples, logp):
    weighted(algo, samples)
    loss = micro_loss(algo, samples, logp, offsets(samples))
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


def assert_split_invariant(algo, samples, logp, num_ranks, max_tokens, max_seqs):
    """The loss and gradient summed over the micro-batches of every rank equal the whole
    mini-batch's (fp64, rtol 1e-12)."""
    whole, whole_grad = whole_loss_and_grad(algo, samples, logp)
    start = offsets(samples)
    micros = [m for rank in shard(samples, num_ranks, max_tokens, max_seqs) for m in rank if m]
    assert sorted(id(s) for m in micros for s in m) == sorted(map(id, samples))
    split = sum(micro_loss(algo, m, logp, start) for m in micros)
    (split_grad,) = torch.autograd.grad(split, logp)
    torch.testing.assert_close(split.detach(), whole, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-10, atol=1e-15)


def tokens(logp, old_logp, adv, seq_index=None) -> TokenTensors:
    """Token tensors of hand-made values (float64; one sequence unless `seq_index`)."""
    f = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    logp = f(logp)
    return TokenTensors(
        logp=logp,
        old_logp=f(old_logp),
        advantages=f(adv),
        entropy=None,
        ref_logp=None,
        seq_index=torch.zeros(logp.numel(), dtype=torch.long)
        if seq_index is None
        else torch.tensor(seq_index),
    )
