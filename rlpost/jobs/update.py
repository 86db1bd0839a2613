"""The controller's side of an optimizer step: what it computes over the whole batch
before the learners see any of it, and the learner calls that carry it out.

Exactness by construction: the algorithm's per-token weights (and the token mask,
token inputs and position weights) are computed here over the whole rollout batch or
the whole optimizer-step mini-batch, and only then is it cut into learner ranks and
micro-batches, so the result does not depend on that cut (tests/exactness).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import torch

from rlpost.algorithms.base import TOKEN_MASK, TOKEN_SCALE
from rlpost.config.sections import LearnerConfig
from rlpost.data.batch import Sample, Shard, per_sample, plan, repeat, shard, view
from rlpost.data.stream import derive_seed
from rlpost.tracking.metrics import MetricSums
from rlpost.workers.group import WorkerGroup

# samples -> [rank][micro][Sample]
Split = Callable[[list[Sample]], list[list[list[Sample]]]]


def learner_split(lc: LearnerConfig, packed: bool) -> Split:
    """The cut of a batch across `lc`'s learner ranks and micro-batches (`packed`: the
    learners pack micro-batches, so their budgets count tokens without padding)."""
    return lambda samples: shard(samples, lc.num_learners, lc.micro_batch_tokens, lc.micro_batch_size, packed)


def assign_advantages(batch: list[Sample], advantages: torch.Tensor) -> None:
    """Give each response of the rollout batch (in group order) its advantage per token,
    from `PolicyGradient.advantages`: [prompts, group], one A_i carried by every token of
    response i; or 1-D over all response tokens of the batch in sequence order, one per
    token (a critic's or a process reward's credit)."""
    lengths = [s.num_tokens for s in batch]
    if advantages.dim() == 2 and advantages.numel() == len(batch):
        for s, a in zip(batch, advantages.flatten().tolist()):
            s.advantages = torch.full((s.num_tokens,), a)
        return
    if advantages.dim() != 1 or advantages.numel() != sum(lengths):
        raise ValueError(
            f"advantages must be [prompts, group] ({len(batch)} responses) or one per response "
            f"token ({sum(lengths)}); got shape {tuple(advantages.shape)}"
        )
    for s, a in zip(batch, advantages.detach().float().split(lengths)):
        s.advantages = a.clone()


def groups_of(samples: list[Sample]) -> dict[int, list[Sample]]:
    """The samples by group, groups in order of first appearance."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    return groups


def minibatches(samples: list[Sample], size: int, epochs: int, seed: int, step: int) -> list[list[Sample]]:
    """Each epoch's mini-batches: whole groups, shuffled (seeded by step and epoch), cut
    into `size` samples."""
    groups = list(groups_of(samples).values())
    out = []
    for epoch in range(epochs):
        order = list(range(len(groups)))
        random.Random(derive_seed(seed, "shuffle", step, epoch)).shuffle(order)
        shuffled = [s for g in order for s in groups[g]]
        out += [shuffled[start : start + size] for start in range(0, len(shuffled), size)]
    return out


# ----- before the update: over the whole rollout batch ----------------------------------
def logprob_pass(
    learners: WorkerGroup,
    algorithm,
    samples: list[Sample],
    split: Split,
    rule,
    batch_metrics: dict[str, float],
    collision: bool = False,
) -> dict[str, torch.Tensor]:
    """The old (and reference) log-probs of `samples` from the learners, with the per-token
    temperatures of `rule` (the rule these samples were drawn under), set on each sample,
    and the algorithm's token inputs from their entropies. Returns flat in the order of
    `samples` the log-probs ("logp"), the entropies ("entropy") and, when `collision`,
    sum_v pi(v)^2 ("collision")."""
    parts = split(samples)
    results = learners.call(
        "logprobs", per_rank=[(p, algorithm.needs.reference, rule, collision) for p in parts]
    )
    stats: dict[int, tuple] = {}
    for rank, r in zip(parts, results):  # each rank's results are flat in its shard's order
        ordered = [s for micro in rank for s in micro]
        by_sample = per_sample(r, ordered)
        for s, lp, h, ref, temp, coll in zip(
            ordered,
            by_sample["logp"],
            by_sample["entropy"],
            by_sample["ref_logp"],
            by_sample["temperature"],
            by_sample["collision"],
        ):
            s.old_logp, s.ref_logp, s.temperature = lp, ref, temp
            stats[id(s)] = (lp, h, coll)
    out = {
        name: torch.cat([stats[id(s)][i] for s in samples]) if samples else torch.zeros(0)
        for i, name in enumerate(("logp", "entropy", "collision"))
        if name != "collision" or collision
    }
    entropy = out["entropy"]
    if rule is not None:
        temps = torch.cat([s.temperature for s in samples])
        batch_metrics.update(
            {
                "sampling/temperature_mean": temps.mean().item(),
                "sampling/temperature_min": temps.min().item(),
                "sampling/temperature_max": temps.max().item(),
            }
        )
    for name, values in algorithm.token_inputs(entropy).items():
        for s, v in zip(samples, values.split([s.num_tokens for s in samples])):
            s.extra[name] = v
    return out


def set_token_mask(
    algorithm,
    samples: list[Sample],
    entropy: torch.Tensor | None,
    step: int,
    mask_truncated: bool,
    batch_metrics: dict[str, float],
) -> None:
    """The algorithm's token selection and the runtime's valid tokens (all but those of
    truncated responses, when `mask_truncated`), on each sample."""
    sizes = [s.num_tokens for s in samples]
    valid = None
    if mask_truncated:
        valid = repeat(torch.tensor([not s.truncated for s in samples]), torch.tensor(sizes))
    mask = algorithm.token_mask(entropy, torch.cat([s.advantages for s in samples]), valid, step)
    if mask is not None:
        for s, m in zip(samples, mask.split(sizes)):
            s.extra[TOKEN_MASK] = m
        batch_metrics["selection/token_frac"] = mask.double().mean().item()


def set_position_weights(
    learners: WorkerGroup, algorithm, samples: list[Sample], batch_metrics: dict[str, float]
) -> None:
    """TW-GRPO: each group's position divergences from the learners (whole groups per
    rank, balanced by tokens), turned into the weights of its tokens."""
    groups = list(groups_of(samples).values())
    lengths = [sum(len(s.prompt_ids) + s.num_tokens for s in g) for g in groups]
    parts = [Shard(groups[i] for micro in rank for i in micro) for rank in plan(lengths, len(learners))]
    results = learners.call("position_divergence", per_rank=[(p,) for p in parts])
    scales = []
    for part, divergences in zip(parts, results):
        for group, divergence in zip(part, divergences):
            weights = algorithm.position_weights(divergence)
            for s in group:
                s.extra[TOKEN_SCALE] = weights[: s.num_tokens]
                scales.append(s.extra[TOKEN_SCALE])
    batch_metrics["selection/position_weight_mean"] = torch.cat(scales).mean().item()


# ----- the update: per optimizer-step mini-batch --------------------------------------------
def weighted_minibatches(
    algorithm, minibatches: list[list[Sample]], split: Split
) -> tuple[list[tuple], list[list[list[list[Sample]]]], dict[int, Sample]]:
    """Each mini-batch's aggregation weights over the whole mini-batch, and its copies of
    the samples carrying them ([mini-batch][rank][micro][Sample], cut by `split`): a sample
    in several mini-batches (epochs > 1) has other weights in each, and other
    `minibatch_inputs` (in the copy's own `extra`). Also each copy's original, by id of the
    copy."""
    views, parts, originals = [], [], {}
    for samples in minibatches:
        batch = view(samples)
        weights = algorithm.token_weights(batch)
        sizes = [s.num_tokens for s in samples]
        inputs = {k: v.split(sizes) for k, v in algorithm.minibatch_inputs(batch).items()}
        copies = [
            replace(s, weights=w, extra={**s.extra, **{k: v[i] for k, v in inputs.items()}})
            if inputs
            else replace(s, weights=w)
            for i, (s, w) in enumerate(zip(samples, weights.split(sizes)))
        ]
        originals.update((id(c), s) for c, s in zip(copies, samples))
        parts.append(split(copies))
        views.append((batch, weights))
    return views, parts, originals


def merged_metrics(algorithm, views: list[tuple], per_rank: list[list[MetricSums]]) -> list[MetricSums]:
    """Per mini-batch: the ranks' metrics merged, with the weights' own metrics."""
    out = []
    for i, (batch, weights) in enumerate(views):
        merged = MetricSums()
        for rank in per_rank:
            merged.merge(rank[i])
        for name, value in algorithm.weight_metrics(batch, weights).items():
            merged.add_mean(name, value)
        out.append(merged)
    return out


def train_minibatches(
    learners: WorkerGroup, algorithm, minibatches: list[list[Sample]], split: Split
) -> list[MetricSums]:
    """One optimizer step per mini-batch: aggregation weights over each whole mini-batch,
    then each split across learner ranks and micro-batches by `split`. One call per rank
    takes them all: the weights depend on the samples alone, not on the policy the earlier
    steps leave, and each call to a Ray actor costs milliseconds."""
    views, parts, _ = weighted_minibatches(algorithm, minibatches, split)
    results = learners.call(
        "train_minibatches", per_rank=[([p[rank] for p in parts],) for rank in range(len(learners))]
    )
    return merged_metrics(algorithm, views, results)


def score_and_train(
    learners: WorkerGroup, algorithm, minibatches: list[list[Sample]], split: Split, with_ref: bool
) -> tuple[list[MetricSums], dict[int, torch.Tensor]]:
    """`train_minibatches` with the log-prob pass in the same learner call
    (`Learner.score_and_train`; one epoch: each sample in one mini-batch). Sets each
    sample's old_logp (and ref_logp) as the learner scored it; returns the metrics and
    the entropies by id of the sample."""
    views, parts, originals = weighted_minibatches(algorithm, minibatches, split)
    results = learners.call(
        "score_and_train", per_rank=[([p[rank] for p in parts], with_ref) for rank in range(len(learners))]
    )
    entropies = {}
    for rank, (scores, _) in enumerate(results):
        copies = [c for p in parts for micro in p[rank] for c in micro]
        by_sample = per_sample(scores, copies)
        for c, lp, h, ref in zip(copies, by_sample["logp"], by_sample["entropy"], by_sample["ref_logp"]):
            s = originals[id(c)]
            s.old_logp, s.ref_logp = lp, ref
            entropies[id(s)] = h
    return merged_metrics(algorithm, views, [metrics for _, metrics in results]), entropies
