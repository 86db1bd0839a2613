"""Samples, and how a mini-batch becomes learner micro-batches.

A `Sample` is one prompt + response. Per-token fields (advantages, old and
reference log-probs, aggregation weights) are 1-D tensors over the response
tokens. Micro-batches are right-padded only to their own longest sequence and
carry their token fields flat, so nothing is padded in the response dimension.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlpost.algorithms.base import MiniBatchView

TOKEN_FIELDS = ("advantages", "old_logp", "ref_logp", "weights")


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    group: int = 0  # index of the prompt within the rollout batch
    reward: float = 0.0
    truncated: bool = False
    rollout_logp: list[float] = field(default_factory=list)
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # algorithm's token_inputs

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)


def collate(samples: list[Sample], pad_id: int) -> dict:
    """Right-padded input ids plus flat per-response-token tensors.

    `pred_pos[k]` is the flat index into [B * L] of the hidden state that
    predicts response token k (the position just before it).
    """
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    width = max(lengths)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    pred_pos, targets, seq_index = [], [], []
    for b, s in enumerate(samples):
        ids = s.prompt_ids + s.response_ids
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention_mask[b, :len(ids)] = 1
        p = len(s.prompt_ids)
        pred_pos.append(torch.arange(p - 1, len(ids) - 1) + b * width)
        targets.append(torch.tensor(s.response_ids, dtype=torch.long))
        seq_index.append(torch.full((len(s.response_ids),), b, dtype=torch.long))
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pred_pos": torch.cat(pred_pos),
        "targets": torch.cat(targets),
        "seq_index": torch.cat(seq_index),
    }
    out["extra"] = {k: torch.cat([s.extra[k] for s in samples]) for k in samples[0].extra}
    for name in TOKEN_FIELDS:
        values = [getattr(s, name) for s in samples]
        if all(v is not None for v in values):
            out[name] = torch.cat([v.to(torch.float64 if name == "weights" else torch.float32)
                                   for v in values])
    return out


def view(samples: list[Sample]) -> MiniBatchView:
    lengths = torch.tensor([s.num_tokens for s in samples], dtype=torch.long)
    return MiniBatchView(
        seq_index=torch.repeat_interleave(torch.arange(len(samples)), lengths),
        lengths=lengths,
        advantages=torch.cat([s.advantages for s in samples]) if samples and
        samples[0].advantages is not None else torch.zeros(int(lengths.sum())),
        group_index=torch.tensor([s.group for s in samples], dtype=torch.long),
        num_sequences=len(samples),
    )


def shard(samples: list, num_ranks: int, micro_batch_size: int) -> list[list[list]]:
    """Split a list across ranks (contiguous blocks), then into micro-batches.

    Returns [rank][micro][item]. Every rank gets the same number of
    micro-batches so that all ranks step together; a rank may get an empty
    trailing micro-batch only when the list does not divide evenly.
    """
    per_rank = -(-len(samples) // num_ranks)
    out = []
    for r in range(num_ranks):
        block = samples[r * per_rank:(r + 1) * per_rank]
        out.append([block[i:i + micro_batch_size] for i in range(0, len(block), micro_batch_size)])
    most = max(len(m) for m in out)
    for m in out:
        m.extend([] for _ in range(most - len(m)))
    return out
