"""VinePPO's Monte-Carlo values (docs/algorithms.md section 5): K continuations from the prefix
at each step boundary, sampled by the rollout engines and scored by the reward pool.

V_hat(s_0) of a response is the leave-one-out mean reward of its group's other responses
(independent samples from the prompt at the training temperature); V_hat(s_k), k >= 1, the
mean reward of K continuations of the response's first k steps, each cut where the
response's own budget would end (rollout.max_new_tokens counts the prefix): the same
distribution as generating with that budget. Seeded by (seed, "vine", step), so a resumed
run samples the same continuations.
"""

from __future__ import annotations

import time

import torch

from rlpost.data.batch import Sample
from rlpost.data.stream import derive_seed
from rlpost.rewards import Problem


def state_values(
    trainer,
    step: int,
    batch: list[Sample],
    problems: list[Problem],
    ends: list[torch.Tensor],
    rewards: torch.Tensor,
    k: int,
    metrics: dict[str, float],
) -> list[torch.Tensor]:
    """V_hat(s_0..s_{K_i - 1}) of each response of `batch` (groups in order, `problems` one per
    group, `ends` its steps' token ends, `rewards` [P, G]); the extra generation's size and
    time into `metrics`."""
    rc = trainer.cfg.rollout
    g = rewards.shape[1]
    first = (rewards.sum(1, keepdim=True) - rewards) / (g - 1) if g > 1 else torch.zeros_like(rewards)
    values = [v.view(1) for v in first.flatten()]
    prefixes, owners = [], []  # one per boundary after a response's first step
    for i, (s, e) in enumerate(zip(batch, ends)):
        for end in e[:-1].tolist():
            prefixes.append(s.response_ids[:end])
            owners.append(i)
    if not prefixes:
        return values
    t0 = time.perf_counter()
    prompts = [batch[i].prompt_ids + p for i, p in zip(owners, prefixes)]
    longest = rc.max_new_tokens - min(len(p) for p in prefixes)
    completions = generate_from_ids(trainer, prompts, k, longest, derive_seed(trainer.cfg.seed, "vine", step))
    responses, scored = [], []
    for i, prefix, group in zip(owners, prefixes, completions):
        budget = rc.max_new_tokens - len(prefix)
        responses += [prefix + c.ids[:budget] for c in group]
        scored += [problems[i // g]] * len(group)
    result = trainer.score(responses, scored)
    means = torch.tensor(result.totals, dtype=torch.float64).view(len(prefixes), k).mean(1)
    for i, v in zip(owners, means):
        values[i] = torch.cat([values[i], v.view(1)])
    generated = sum(len(r) for r in responses) - k * sum(len(p) for p in prefixes)
    metrics.update(
        {
            "vine/boundaries": len(prefixes),
            "vine/continuations": len(responses),
            "vine/continuation_tokens": generated,
            "vine/continuation_tokens_per_rollout_token": generated
            / max(1, sum(s.num_tokens for s in batch)),
            "time/vine_continuations": time.perf_counter() - t0,
        }
    )
    return values


def generate_from_ids(
    trainer, prompts: list[list[int]], n: int, max_new_tokens: int, seed: int
) -> list[list]:
    """`n` completions of each token-id prompt from the rollout workers (split evenly, each
    seeded by (seed, its rank)), at the training temperature. Timed by the workers but not
    counted in their compute clocks (`generate_timed`): the step counts it as credit time."""
    rc = trainer.cfg.rollout
    workers = len(trainer.rollout)
    per = -(-len(prompts) // workers)
    chunks = [
        (
            prompts[r * per : (r + 1) * per],
            n,
            rc.temperature,
            rc.top_p,
            max_new_tokens,
            derive_seed(seed, r),
            None,
        )
        for r in range(workers)
    ]
    results = trainer.rollout.call("generate_timed", per_rank=chunks)
    completions = [c for part, _ in results for c in part]
    if trainer.weights is not None:
        trainer.weights.check_rollouts(completions, None)
    return completions
