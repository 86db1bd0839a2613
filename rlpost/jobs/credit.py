"""Credit beyond the outcome, the controller's side (docs/algorithms.md section 5).

An algorithm's `Needs` ask for what its `credit` reads; this module gets it, over the whole
rollout batch, before any advantage, and keeps the roles that make it:

- `values`: a critic group (rlpost/workers/critic.py, `critic:` section) gives V(s_t) of every
  response token; after the policy's update it regresses on the returns `credit` gave.
- `token_collision`, `credit_entropy`: the learners' log-prob pass runs first (rl.py calls it;
  the result arrives here as `statistics`), with sum_v pi(v)^2 under `token_collision`.
- `problem_outcomes`: each group's problem by a stable key (`problem_key`) and each
  response's verifier outcome (CEEH keeps per-question statistics across steps).
- `step_rewards`: each response split into steps (`step_credit.split`), each step scored
  (`step_credit.reward`).
- `continuations`: the rollout engines sample K continuations from the prefix at each step
  boundary, the reward pool scores them, their mean is the state's value (VinePPO).
- `implicit_prm`: a PRM group (PRIME, `prm:` section) gives log pi_phi and log pi_ref of every
  token, then trains on the step's outcome labels.

Every random choice is seeded from (seed, step), so resumed runs repeat them; the critic and
the PRM are checkpointed with the policy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.base import Credit, CreditInputs
from rlpost.algorithms.prime import IMPLICIT_PRM_LOSS
from rlpost.algorithms.step_credit import merge_steps
from rlpost.algorithms.token_credit import position_bucket_metrics
from rlpost.data.batch import Sample
from rlpost.data.steps import StepSplitter
from rlpost.jobs.continuations import state_values
from rlpost.jobs.model_roles import PRMScores, critic_values, start_role, train_critic
from rlpost.rewards import Problem
from rlpost.rewards.steps import step_scorer
from rlpost.tracking.credit_view import pick_credit_rows, write_credit_view
from rlpost.workers.critic import Critic
from rlpost.workers.group import WorkerGroup
from rlpost.workers.learner import ImplicitPRM


class CreditRoles:
    """The credit inputs of one trainer's algorithm, and the critic and PRM groups they need."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.needs = trainer.algorithm.needs
        self.critic: WorkerGroup | None = None
        self.prm: WorkerGroup | None = None
        self.prm_loss = None
        self.splitter = self.scorer = None  # made by `start`, once the tokenizer is up
        # the latest credit: the critic's targets and inputs, and what `write_view` shows
        self.returns = self.values = None
        self.last_batch: list[tuple] = []

    @property
    def groups(self) -> dict[str, WorkerGroup]:
        return {name: g for name, g in (("critic", self.critic), ("prm", self.prm)) if g is not None}

    def start(self, start_model: Path) -> None:
        """The step splitter and scorer, the critic and the PRM (from their `model` or the
        policy's starting model)."""
        t, cfg = self.trainer, self.trainer.cfg
        if self.needs.step_rewards or self.needs.continuations:
            self.splitter = StepSplitter(cfg.step_credit, t.tokenizer)
        if self.needs.step_rewards:
            self.scorer = step_scorer(cfg.step_credit.reward, t.task)
        if self.needs.values:
            self.critic = start_role(t, "critic", cfg.critic, start_model, None, Critic)
        if self.needs.implicit_prm:
            loss = (IMPLICIT_PRM_LOSS, {"beta": t.algorithm.cfg.beta})
            self.prm_loss = build_algorithm(*loss)
            self.prm = start_role(t, "prm", cfg.prm, start_model, loss, ImplicitPRM)

    # ----- before the advantages ------------------------------------------------------------
    def credit(
        self,
        step: int,
        batch: list[Sample],
        rollouts,
        statistics: dict[str, torch.Tensor] | None,
        times: dict[str, float],
        metrics: dict[str, float],
    ) -> Credit:
        """The algorithm's credit of `batch` (the samples of `rollouts.groups`, in order), with
        what its needs ask for; `statistics`: the old policy's log-prob pass when the needs
        asked for it first (`Needs.logprobs_before_credit`)."""
        t0 = time.perf_counter()
        t, needs = self.trainer, self.needs
        problems = rollouts.problems
        shape = (len(rollouts.groups), t.cfg.rollout.n)
        rewards = torch.tensor([s.reward for s in batch], dtype=torch.float64).view(shape)
        lengths = torch.tensor([s.num_tokens for s in batch]).view(shape)
        inputs = CreditInputs(rewards, lengths, step, total_steps=t.cfg.steps)
        if statistics is not None:
            inputs.old_logp, inputs.entropy = statistics["logp"], statistics["entropy"]
            inputs.collision = statistics.get("collision")
        if needs.implicit_prm or needs.problem_outcomes:
            correct = [rollouts.correct[id(s)] for s in batch]  # the verifier's outcome labels
        if needs.problem_outcomes:
            inputs.prompts = [problem_key(p) for p in problems]
            inputs.correct = torch.tensor(correct, dtype=torch.bool).view(shape)
        if needs.values:
            inputs.values = critic_values(t, self.critic, batch)
        if needs.step_rewards or needs.continuations:
            self._steps(step, batch, problems, inputs, metrics)
        if needs.implicit_prm:
            scores = PRMScores(t, self.prm, self.prm_loss, batch, correct)
            inputs.prm_logp, inputs.prm_ref_logp = scores.logp, scores.ref_logp
            metrics["prm/accuracy"] = scores.accuracy()
        credit = t.algorithm.credit(inputs)
        if needs.implicit_prm:
            metrics.update(scores.train(step))
        metrics.update(credit.metrics)
        if credit.advantages.dim() == 1:
            metrics.update(position_bucket_metrics(credit.advantages, inputs.lengths.flatten()))
        self.returns, self.values = credit.returns, inputs.values
        if self.active:  # the outcome's advantages alone are the reward phase's
            times["credit"] = time.perf_counter() - t0
        return credit

    @property
    def active(self) -> bool:
        """Whether the algorithm's credit reads more than the outcome rewards."""
        n = self.needs
        return (
            n.values
            or n.logprobs_before_credit
            or n.step_rewards
            or n.continuations > 0
            or n.implicit_prm
            or n.problem_outcomes
        )

    def _steps(
        self, step: int, batch: list[Sample], problems: list[Problem], inputs: CreditInputs, metrics: dict
    ) -> None:
        """Each response's step ends, and its step rewards or its states' values."""
        n = self.trainer.cfg.rollout.n
        split = [self.splitter(s.response_ids) for s in batch]
        ends = [torch.tensor(e, dtype=torch.long) for _, e, _ in split]
        if self.needs.continuations:
            if self.needs.max_boundaries is not None:
                ends = [merge_steps(e, self.needs.max_boundaries) for e in ends]
            k = self.needs.continuations
            inputs.state_values = state_values(
                self.trainer, step, batch, problems, ends, inputs.rewards, k, metrics
            )
        if self.needs.step_rewards:
            rewards = [
                torch.tensor(self.scorer(problems[i // n], texts), dtype=torch.float64)
                for i, (_, _, texts) in enumerate(split)
            ]
            scored = torch.cat(rewards) if rewards else torch.zeros(0)
            inputs.step_rewards = rewards
            if scored.numel():
                metrics["steps/reward_mean"] = scored.mean().item()
        inputs.step_ends = ends
        metrics["steps/per_response"] = sum(len(e) for e in ends) / max(len(ends), 1)

    # ----- after the policy's update ----------------------------------------------------------
    def train_critic(self, step: int, batch: list[Sample], metrics: dict[str, float]) -> None:
        """The critic's regression on the returns of this step's credit (`train_critic`)."""
        metrics.update(train_critic(self.trainer, self.critic, step, batch, self.returns, self.values))

    # ----- the token-credit view ------------------------------------------------------------
    def keep_for_view(self, batch: list[Sample]) -> None:
        """The step's responses and their per-token advantages, for the next `write_view`."""
        self.last_batch = [(s.response_ids, s.advantages, s.reward, s.group) for s in batch]

    def write_view(self, out_dir: Path, step: int) -> None:
        """A few of the latest step's responses, their tokens shaded by their advantage
        (RUN_DIR/credit/credit_step_<step>.html and .png)."""
        rows = self.last_batch
        if not rows:
            return
        t = self.trainer
        picked = pick_credit_rows(
            [ids for ids, *_ in rows],
            [a for _, a, _, _ in rows],
            [r for *_, r, _ in rows],
            [g for *_, g in rows],
        )
        view = [
            (
                f"reward {rows[i][2]:g}, group {rows[i][3]}",
                [t.tokenizer.decode([token]) for token in rows[i][0]],
                rows[i][1].tolist(),
            )
            for i in picked
        ]
        out_dir.mkdir(parents=True, exist_ok=True)
        write_credit_view(out_dir, f"step_{step}", view, t.cfg.algorithm.name)

    # ----- checkpoints -------------------------------------------------------------------------
    def save(self, tag_dir: Path) -> None:
        for name, group in self.groups.items():
            group.call("save_checkpoint", str(tag_dir), name)

    def load(self, tag_dir: Path) -> None:
        for name, group in self.groups.items():
            group.call("load_checkpoint", str(tag_dir), name)

    def shutdown(self) -> None:
        for group in self.groups.values():
            group.shutdown()
        self.critic = self.prm = None


def problem_key(problem: Problem) -> str:
    """A problem's key, the same in every step and after a resume: its prompt (a conversation
    as JSON)."""
    prompt = problem.prompt
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
