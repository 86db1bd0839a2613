"""The models an algorithm trains beside the policy (docs/algorithms.md section 5): PPO's
critic (rlpost/workers/critic.py) and PRIME's implicit PRM (`ImplicitPRM`, a learner of
`algorithms.prime.ImplicitPRMLoss`), the controller's side.

Each is a learner group of `learner.num_learners` ranks started from its section's `model`
or the policy's starting model, placed by `Placement` under its role name, and fed whole
batches cut like the policy's (`trainer.split`); its losses' weights are computed here over
each whole mini-batch, so its updates are exact under any cut, like the policy's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from rlpost.algorithms.prime import OUTCOME_LABEL, sequence_logits
from rlpost.data.batch import Sample, per_sample
from rlpost.jobs.update import minibatches, train_minibatches
from rlpost.tracking.metrics import MetricSums
from rlpost.workers.group import WorkerGroup
from rlpost.workers.learner import start_learner_group
from rlpost.workers.policy_rank import LRSchedule

RETURNS, OLD_VALUES = "returns", "old_values"  # Sample.extra of the critic's samples


def start_role(trainer, role: str, section, start_model: Path, algorithm, cls) -> WorkerGroup:
    """A learner group running `cls` for `role` ("critic", "prm") under its config `section`."""
    return start_learner_group(
        trainer.cfg,
        section.model or start_model,
        algorithm,
        LRSchedule(section.lr, section.lr_warmup_steps),
        pad_id=trainer.tokenizer.pad_token_id,
        use_ray=trainer.use_ray,
        slots=trainer.placement.slots(role),
        role=cls,
    )


def per_token(trainer, group: WorkerGroup, method: str, samples: list[Sample], *args) -> dict[int, dict]:
    """`method`'s per-token results over `samples`, cut like the policy's learners cut a batch:
    by id of the sample, each result's piece for it (a method returning one flat tensor gives
    it under "values")."""
    parts = trainer.split(samples)
    results = group.call(method, per_rank=[(p, *args) for p in parts])
    out = {}
    for rank, flat in zip(parts, results):
        ordered = [s for micro in rank for s in micro]
        pieces = per_sample(flat if isinstance(flat, dict) else {"values": flat}, ordered)
        for i, s in enumerate(ordered):
            out[id(s)] = {k: v[i] for k, v in pieces.items()}
    return out


def critic_values(trainer, critic: WorkerGroup, batch: list[Sample]) -> torch.Tensor:
    """V(s_t) of every response token of `batch`, flat in its order."""
    by_id = per_token(trainer, critic, "values", batch)
    return torch.cat([by_id[id(s)]["values"] for s in batch]) if batch else torch.zeros(0)


def train_critic(
    trainer, critic: WorkerGroup, step: int, batch: list[Sample], returns: torch.Tensor, values: torch.Tensor
) -> dict[str, float]:
    """The critic's regression on `returns` (its `values` before: the clip's V_old), in the
    policy's mini-batches and epochs; each token weighs 1 / its mini-batch's token count.
    Returns the step means of its metrics."""
    lc, sizes = trainer.cfg.learner, [s.num_tokens for s in batch]
    copies = [
        replace(s, extra={RETURNS: r, OLD_VALUES: v})
        for s, r, v in zip(batch, returns.float().split(sizes), values.float().split(sizes))
    ]
    parts = []
    for mb in minibatches(copies, lc.mini_batch_size, lc.epochs, trainer.cfg.seed, step):
        share = 1.0 / max(1, sum(s.num_tokens for s in mb))
        parts.append(
            trainer.split(
                [replace(s, weights=torch.full((s.num_tokens,), share, dtype=torch.float64)) for s in mb]
            )
        )
    results = critic.call(
        "train_values", per_rank=[([p[rank] for p in parts],) for rank in range(len(critic))]
    )
    merged = MetricSums()
    for i in range(len(parts)):
        one = MetricSums()
        for rank in results:
            one.merge(rank[i])
        for k, v in one.result().items():
            merged.add_mean(k, v)
    return merged.result()


class PRMScores:
    """log pi_phi and log pi_ref of every token of a batch from the PRM group, before it trains
    on the batch's labels; `train` then runs its loss over the batch once."""

    def __init__(self, trainer, prm: WorkerGroup, loss, batch: list[Sample], correct: list[bool]):
        self.trainer, self.prm, self.loss, self.batch, self.correct = trainer, prm, loss, batch, correct
        self.by_id = per_token(trainer, prm, "logprobs", batch, True)
        self.logp = torch.cat([self.by_id[id(s)]["logp"] for s in batch])
        self.ref_logp = torch.cat([self.by_id[id(s)]["ref_logp"] for s in batch])

    def accuracy(self) -> float:
        """How often the sign of beta sum_t log(pi_phi / pi_ref) matches the outcome label."""
        lengths = torch.tensor([s.num_tokens for s in self.batch])
        seq = torch.repeat_interleave(torch.arange(len(self.batch)), lengths)
        logits = sequence_logits(self.loss.cfg.beta, self.logp - self.ref_logp, seq, len(self.batch))
        return ((logits > 0) == torch.tensor(self.correct)).double().mean().item()

    def train(self, step: int) -> dict[str, float]:
        """One pass of the PRM's loss over the batch, in the policy's mini-batches."""
        t = self.trainer
        copies = [
            replace(
                s,
                old_logp=self.by_id[id(s)]["logp"],
                ref_logp=self.by_id[id(s)]["ref_logp"],
                extra={OUTCOME_LABEL: torch.full((s.num_tokens,), float(ok))},
            )
            for s, ok in zip(self.batch, self.correct)
        ]
        batches = minibatches(copies, t.cfg.learner.mini_batch_size, 1, t.cfg.seed, step)
        merged = MetricSums()
        for m in train_minibatches(self.prm, self.loss, batches, t.split):
            for k, v in m.result().items():
                merged.add_mean(k, v)
        return {f"prm/{k}": v for k, v in merged.result().items()}
