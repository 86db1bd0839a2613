"""Log-probs and entropies of chosen tokens, computed chunk by chunk.

The output head is applied to at most `chunk_size` hidden states at a time and
each chunk is recomputed in the backward pass (activation checkpointing), so
no [tokens x vocab] tensor is ever kept: peak memory is [chunk x vocab].
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_logprob_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                           temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    probs = torch.softmax(logits, dim=-1)
    entropy = log_z - (probs * logits).sum(-1)
    return logp, entropy


def chunked_logprobs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                     chunk_size: int = 1024, temperature: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H] (the states that predict each target), targets [N] -> logp [N], entropy [N]."""
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(_chunk_logprob_entropy, head, h, y, temperature,
                                 use_reentrant=False)
        else:
            lp, ent = _chunk_logprob_entropy(head, h, y, temperature)
        logps.append(lp)
        entropies.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(entropies)
