"""Aggregation of per-token losses as per-token weights over a whole mini-batch.

loss = sum_{i,t} w_{i,t} * l_{i,t}; see ALGORITHMS.md "Aggregation".
"""
from __future__ import annotations

import torch

from rlpost.algorithms.base import MiniBatchView


def token_mean(b: MiniBatchView) -> torch.Tensor:
    n_tokens = b.seq_index.numel()
    return torch.full((n_tokens,), 1.0 / max(n_tokens, 1), dtype=torch.float64)


def seq_mean_token_mean(b: MiniBatchView) -> torch.Tensor:
    per_seq = 1.0 / (b.lengths.clamp(min=1).double() * b.num_sequences)
    return per_seq[b.seq_index]


AGGREGATIONS = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
}
