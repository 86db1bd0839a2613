"""Aggregation of per-token losses as per-token weights over a whole mini-batch.

loss = sum_{i,t} w_{i,t} * l_{i,t}; see docs/algorithms.md "Aggregation". The weights
are computed on the controller over one whole optimizer-step mini-batch, before
it is split into micro-batches and ranks, so every normaliser below (token
counts, sequence counts, group sizes) is a mini-batch quantity and the loss
cannot depend on the split.

`AGGREGATIONS` maps a name to a callable `(b, constant) -> float64 weights [T]`;
only "constant" reads `constant` (from the config), the others ignore it. These
callables see every token; `aggregate` applies one under the view's token mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlpost.algorithms.base import MiniBatchView


def token_mean(b: MiniBatchView, constant: float | None = None) -> torch.Tensor:
    """sum m l / sum m over the mini-batch: 1/T per token."""
    n_tokens = b.seq_index.numel()
    return torch.full((n_tokens,), 1.0 / max(n_tokens, 1), dtype=torch.float64)


def seq_mean_token_mean(b: MiniBatchView, constant: float | None = None) -> torch.Tensor:
    """Mean over sequences of (sum_t l / |o_i|): 1/(S |o_i|) per token of o_i."""
    per_seq = 1.0 / (b.lengths.clamp(min=1).double() * b.num_sequences)
    return per_seq[b.seq_index]


def seq_mean_token_sum(b: MiniBatchView, constant: float | None = None) -> torch.Tensor:
    """Mean over sequences of sum_t l: 1/S per token."""
    n_tokens = b.seq_index.numel()
    return torch.full((n_tokens,), 1.0 / max(b.num_sequences, 1), dtype=torch.float64)


def constant_normaliser(b: MiniBatchView, constant: float | None = None) -> torch.Tensor:
    """sum m l / C (Dr. GRPO) with C a constant from the config, never derived from
    padded widths: 1/C per token."""
    if constant is None:
        raise ValueError(
            "aggregation 'constant' needs the normaliser C from the config "
            "(e.g. max response length * number of sequences); got None"
        )
    if not constant > 0:
        raise ValueError(f"aggregation 'constant' needs a normaliser C > 0; got {constant!r}")
    return torch.full((b.seq_index.numel(),), 1.0 / float(constant), dtype=torch.float64)


def _sequence_advantages(b: MiniBatchView) -> torch.Tensor:
    """Advantage of each sequence = the advantage of its first token; 0 for a
    sequence with no tokens (it then sits on neither side)."""
    lengths = b.lengths.long()
    first = torch.cumsum(lengths, 0) - lengths
    adv = torch.zeros(lengths.numel(), dtype=torch.float64)
    has = lengths > 0
    adv[has] = b.advantages[first[has]].double()
    return adv


def balanced(b: MiniBatchView, constant: float | None = None) -> torch.Tensor:
    """Balanced Aggregation (BA). Per group g, S+ = {i: A_i > 0}, S- = {i: A_i < 0},
    k = |S+|, n- = |S-|, N+ / N- their token counts:
    L_g = (k/G) sum_{S+} sum_t l / N+ + (n-/G) sum_{S-} sum_t l / N-,
    and the loss is the mean of L_g over the groups of the mini-batch.

    Token weights: (k/G)/N+ on S+ tokens, (n-/G)/N- on S- tokens, 0 on
    zero-advantage tokens, each divided by the number of groups.

    Choices where the definition leaves room:
    - G is the number of sequences of group g present in this mini-batch (a group
      split across mini-batches is normalised by its part here). Zero-advantage and
      zero-length sequences count in G.
    - The number of groups counts every distinct `group_index` in the mini-batch,
      including groups whose advantages are all zero (their L_g is 0).
    - A sequence's side is the sign of its first token's advantage.
    """
    n_tokens = b.seq_index.numel()
    if b.num_sequences == 0 or n_tokens == 0:
        return torch.zeros(n_tokens, dtype=torch.float64)
    _, g = torch.unique(b.group_index, return_inverse=True)
    n_groups = int(g.max().item()) + 1
    lengths = b.lengths.double()
    adv = _sequence_advantages(b)
    pos, neg = (adv > 0).double(), (adv < 0).double()

    def per_group(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, x)

    size = per_group(torch.ones_like(lengths))
    k, n_neg = per_group(pos), per_group(neg)
    tok_pos, tok_neg = per_group(pos * lengths), per_group(neg * lengths)
    # a side with k > 0 has N > 0 (zero-length sequences are on no side); clamp only
    # guards the empty sides, whose weight is multiplied by 0 anyway
    w_pos = k / size / tok_pos.clamp(min=1)
    w_neg = n_neg / size / tok_neg.clamp(min=1)
    per_seq = (pos * w_pos[g] + neg * w_neg[g]) / n_groups
    return per_seq[b.seq_index]


def side_weights(b: MiniBatchView, weights: torch.Tensor) -> tuple[float, float]:
    """Total weight on positive-advantage tokens and on negative-advantage tokens
    (diagnostics: under token-mean these are the token shares N+/N and N-/N, under
    BA the group-averaged response shares k/G and n-/G)."""
    w = weights.double()
    return (float(w[b.advantages > 0].sum().item()), float(w[b.advantages < 0].sum().item()))


AGGREGATIONS: dict[str, Callable[[MiniBatchView, float | None], torch.Tensor]] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "constant": constant_normaliser,
    "balanced": balanced,
}


def aggregate(name: str, b: MiniBatchView, constant: float | None = None) -> torch.Tensor:
    """`AGGREGATIONS[name]` over the tokens `b.token_mask` keeps: the weights are
    those of the mini-batch with the masked tokens deleted, so masked tokens weigh 0
    and leave every normaliser (token counts, |o_i|, N+ and N-). A sequence whose
    tokens are all masked leaves the sequence counts too (S, G and the number of
    groups); a sequence without tokens stays, as it does without a mask."""
    fn = AGGREGATIONS[name]
    if b.token_mask is None:
        return fn(b, constant)
    kept = b.token_mask.bool()
    kept_lengths = torch.zeros(b.num_sequences, dtype=torch.long).index_add_(0, b.seq_index, kept.long())
    stays = (kept_lengths > 0) | (b.lengths == 0)
    new_index = torch.cumsum(stays.long(), 0) - 1
    reduced = MiniBatchView(
        seq_index=new_index[b.seq_index[kept]],
        lengths=kept_lengths[stays],
        advantages=b.advantages[kept],
        group_index=b.group_index[stays],
        num_sequences=int(stays.sum().item()),
    )
    weights = torch.zeros(b.seq_index.numel(), dtype=torch.float64)
    weights[kept] = fn(reduced, constant)
    return weights
