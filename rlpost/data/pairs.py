"""Offline examples as learner `Sample`s, and preference pairs cut into micro-batches whole.

A pair is two samples (prompt + chosen, prompt + rejected) whose tokens carry the pair's
number within its mini-batch and their side (`algorithms.preference.PAIR_INDEX`,
`CHOSEN_SIDE`), with cDPO its critical weights (`REWARD_WEIGHT`) and with T-REG its token
rewards (`TOKEN_REWARD`). The preference losses are not linear in a pair's sums, so
`shard_pairs` never separates the two sequences of a pair: it runs `batch.plan` over
pairs, then expands each pair to its two samples.
"""

from __future__ import annotations

import torch

from rlpost.algorithms.base import CHOSEN_SIDE, PAIR_INDEX, REWARD_WEIGHT, TOKEN_REWARD
from rlpost.data.batch import Sample, Shard, plan
from rlpost.data.datasets import PreferencePair, SFTExample


def pair_samples(
    pairs: list[PreferencePair], critical_weights: bool = False, token_rewards: bool = False
) -> list[tuple[Sample, Sample]]:
    """(chosen, rejected) samples of each pair, numbered by its place in `pairs`.
    `critical_weights`: the rejected tokens carry the pair's `rejected_weights`, the
    chosen ones 1. `token_rewards`: both carry the pair's `token_rewards`."""
    out = []
    for index, pair in enumerate(pairs):
        sides = []
        for side, (ids, chosen) in enumerate(((pair.chosen_ids, True), (pair.rejected_ids, False))):
            extra = {
                PAIR_INDEX: torch.full((len(ids),), index, dtype=torch.long),
                CHOSEN_SIDE: torch.full((len(ids),), chosen, dtype=torch.bool),
            }
            if critical_weights:
                extra[REWARD_WEIGHT] = (
                    torch.ones(len(ids))
                    if chosen
                    else torch.tensor(pair.rejected_weights, dtype=torch.float32)
                )
            if token_rewards:
                extra[TOKEN_REWARD] = torch.tensor(pair.token_rewards[side], dtype=torch.float32)
            sides.append(Sample(prompt_ids=pair.prompt_ids, response_ids=ids, extra=extra))
        out.append((sides[0], sides[1]))
    return out


def shard_pairs(
    pairs: list[tuple[Sample, Sample]],
    num_ranks: int,
    max_tokens: int | None = None,
    max_seqs: int | None = None,
    packed: bool = True,
) -> list[list[list[Sample]]]:
    """[rank][micro][Sample] with both samples of every pair in the same micro-batch.

    The budgets hold as `batch.shard` holds them: packed, a pair costs the sum of its two
    lengths; padded, a micro-batch costs its longest sequence times its sequences, so each
    pair enters `plan` as its longer sequence against half the budget. A pair over the
    budget gets a micro-batch of its own."""

    def length(s: Sample) -> int:
        return len(s.prompt_ids) + s.num_tokens

    if packed:
        sizes, budget = [length(w) + length(r) for w, r in pairs], max_tokens
    else:
        sizes = [max(length(w), length(r)) for w, r in pairs]
        budget = None if max_tokens is None else max_tokens // 2
    seqs = None if max_seqs is None else max(1, max_seqs // 2)
    return [
        Shard([s for i in micro for s in pairs[i]] for micro in rank)
        for rank in plan(sizes, num_ranks, budget, seqs, packed)
    ]


def sft_samples(examples: list[SFTExample]) -> list[Sample]:
    return [Sample(prompt_ids=e.prompt_ids, response_ids=e.completion_ids) for e in examples]
