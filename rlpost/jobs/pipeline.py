"""Deterministic k-step-off generation: batch t is sampled with the weights step t-k trained from.

With `rollout.staleness` k, the controller sends the rollout workers batch t+k's first
round of prompts at the start of step t, before it trains on batch t: on Ray the engines
generate it while the learners update, and the weight sync after the update waits for it
(a Ray actor runs its calls in order anyway), so the batch is sampled with the weights
the engines held when it was sent, those after step t-1 (the initial weights for the
first k+1 batches). The in-process mode runs the same calls
in the same order one after another, so both modes make the same samples, and k = 0 is
the synchronous loop: each batch is sent and collected in its own step.

Only a batch's first round is sent ahead: dynamic sampling's extra rounds need its
rewards, so they are generated when the batch is collected, with the latest weights
(lag 0). A checkpoint holds the batches already sent as their completions, so a resumed
run trains on exactly the samples an uninterrupted one would have.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlpost.algorithms import sampling_rule_from_dict
from rlpost.algorithms.base import SamplingRule
from rlpost.algorithms.dapo import informative_groups, overlong_penalty
from rlpost.data.batch import Sample
from rlpost.data.stream import derive_seed
from rlpost.engines.base import Completion
from rlpost.errors import ConfigError
from rlpost.rewards import Problem
from rlpost.rewards.scoring.pool import RewardResult

# in a checkpoint's directory: the batches sent ahead; streaming's groups (streaming.py)
PENDING_FILE, STREAM_FILE = "pending_rollouts.pt", "stream_state.pt"


@dataclass
class Rollouts:
    """What one RL step generated: the groups it trains on and, for metrics, every
    scored sample of every generation round."""

    groups: list[list[Sample]] = field(default_factory=list)  # rollout.n samples each
    problems: list[Problem] = field(default_factory=list)  # of each group (step-level credit reads them)
    correct: dict[int, bool] = field(default_factory=dict)  # the verifier's outcome by id of the sample
    generated: list[Sample] = field(default_factory=list)
    rewards: RewardResult | None = None  # of every generated sample, before overlong shaping
    rounds: int = 0
    scored_groups: int = 0
    dropped_groups: int = 0  # by dynamic sampling
    stale_samples: int = 0  # streaming: dropped for a lag over rollout.staleness
    # per sample of `groups`: the updates between the weights that sampled it (its first
    # token, with partial rollouts) and the learners' (rollout.staleness > 0)
    lags: list[int] = field(default_factory=list)
    rule: SamplingRule | None = None  # the per-token temperature every round was sampled under


@dataclass
class Generation:
    """A batch's first round of generation, sent to the rollout workers."""

    step: int  # the RL step that trains on it
    problems: list[int]  # indices into the training problems
    rule: SamplingRule | None  # the per-token temperature it is sampled under, if any
    version: int | None  # those weights' version, as the learners sent them (None: no syncs)
    parts: list  # per rollout worker: a Ray reference to its completions, or them


class GenerationPipeline:
    """The batches sent ahead, oldest first; at most `staleness` + 1 of them."""

    def __init__(self, trainer, staleness: int, last_step: int):
        self.trainer, self.staleness, self.last_step = trainer, staleness, last_step
        self.pending: deque[Generation] = deque()
        self.next_step = 1  # the first batch not sent yet

    def fill(self, step: int) -> None:
        """Send every batch up to step + staleness (not past the run's last step)."""
        trainer, rc = self.trainer, self.trainer.cfg.rollout
        while self.next_step <= min(step + self.staleness, self.last_step):
            problems = trainer.stream.take(rc.prompts_per_step)
            seed = derive_seed(trainer.cfg.seed, "rollout", self.next_step)
            rule, weights = trainer.sampling_rule, trainer.weights
            parts = trainer.submit_generation(
                [trainer.train_problems[i] for i in problems], rc.n, rc.temperature, seed, rule
            )
            self.pending.append(
                Generation(self.next_step, problems, rule, weights and weights.version, parts)
            )
            self.next_step += 1

    def take(self, step: int) -> tuple[Generation, list[list[Completion]]]:
        """Batch `step`'s generation and its completions (waiting for them)."""
        gen = self.pending.popleft()
        assert gen.step == step, (gen.step, step)
        return gen, self.trainer.collect_generation(gen.parts, gen.version)

    def collect(self, step: int, times: dict[str, float]) -> Rollouts:
        """Generate and score this step's groups. With dynamic sampling, groups whose
        rewards are all equal are dropped and further rounds of prompts_per_step
        prompts are generated, at most max_extra_rounds, until prompts_per_step
        groups are kept; surplus groups are discarded and a short batch trains as
        it is."""
        trainer = self.trainer
        cfg, rc = trainer.cfg, trainer.cfg.rollout
        out = Rollouts()
        for extra in range(1 + (rc.max_extra_rounds if rc.dynamic_sampling else 0)):
            t = time.perf_counter()
            if extra == 0:  # sent ahead by the pipeline (this step, when synchronous)
                self.fill(step)
                sent, completions = self.take(step)
                problems = [trainer.train_problems[i] for i in sent.problems]
                out.rule = sent.rule
            else:
                problems = trainer.take_prompts(rc.prompts_per_step)
                seed = derive_seed(cfg.seed, "rollout", step, "round", extra)
                completions = trainer.generate(problems, rc.n, rc.temperature, seed, out.rule)
            times["rollout"] += time.perf_counter() - t

            t = time.perf_counter()
            for g, p in zip(score_groups(trainer, step, problems, completions, out), problems):
                if g is not None:
                    out.groups.append(g)
                    out.problems.append(p)
            times["reward"] += time.perf_counter() - t
            if len(out.groups) >= rc.prompts_per_step:
                break
        if len(out.groups) < rc.prompts_per_step:
            trainer.tracker.print_line(
                f"step {step}: dynamic sampling kept {len(out.groups)} of "
                f"{rc.prompts_per_step} groups after {out.rounds - 1} extra "
                f"rounds; training on those"
            )
        out.groups, out.problems = out.groups[: rc.prompts_per_step], out.problems[: rc.prompts_per_step]
        number_groups(out.groups)
        if rc.staleness:
            out.lags = [trainer.weights.lag(step, s.weight_version) for g in out.groups for s in g]
        return out

    def sync(self, step: int) -> None:
        """The weights after `step` to the engines, once the batches sent ahead are
        generated: on Ray the engines run them first anyway, and the transfer's
        collectives must not wait behind them (their timeout is the transfer's)."""
        refs = [p for gen in self.pending for p in gen.parts if not isinstance(p, list)]
        if refs:
            import ray

            ray.wait(refs, num_returns=len(refs), fetch_local=False)
        self.trainer.weights.sync(step)

    # ----- checkpoints ------------------------------------------------------------------------
    def save(self, tag_dir: Path) -> None:
        """The batches sent ahead, with their completions (waiting for them), to `tag_dir`."""
        if not self.pending:
            return
        rows = []
        for gen in self.pending:
            completions = self.trainer.collect_generation(gen.parts, gen.version)
            gen.parts = [completions]  # collected once
            rows.append(
                {
                    "step": gen.step,
                    "problems": gen.problems,
                    "rule": gen.rule.to_dict() if gen.rule is not None else None,
                    "version": gen.version,
                    "completions": [[asdict(c) for c in group] for group in completions],
                }
            )
        torch.save({"next_step": self.next_step, "pending": rows}, tag_dir / PENDING_FILE)

    def load(self, tag_dir: Path, step: int) -> None:
        """The batches a checkpoint after `step` had sent ahead (none: a synchronous run)."""
        if (tag_dir / STREAM_FILE).is_file():
            raise ConfigError(
                f"{tag_dir} was written with rollout.async_mode=streaming ({STREAM_FILE}); resume "
                f"with that mode"
            )
        self.next_step = step + 1
        path = tag_dir / PENDING_FILE
        if not path.is_file():
            return
        state = torch.load(path, weights_only=True)
        self.next_step = state["next_step"]
        for row in state["pending"]:
            completions = [[Completion(**c) for c in group] for group in row["completions"]]
            rule = sampling_rule_from_dict(row["rule"]) if row["rule"] is not None else None
            self.pending.append(Generation(row["step"], row["problems"], rule, row["version"], [completions]))


def score_groups(
    trainer, step: int, problems: list[Problem], completions: list[list], out: Rollouts
) -> list[list[Sample] | None]:
    """Each problem's completions as a scored group of samples (overlong shaping on the
    rewards), added to `out`'s generated samples and rewards; with dynamic sampling,
    None in place of each group whose rewards are all equal."""
    rc = trainer.cfg.rollout
    groups = [
        [
            Sample(
                prompt_ids=trainer.encode_prompt(p.prompt),
                response_ids=c.ids,
                truncated=c.truncated,
                rollout_logp=c.logprobs,
                weight_version=c.weight_version,
            )
            for c in group
        ]
        for p, group in zip(problems, completions)
    ]
    scored = [s for g in groups for s in g]
    result = trainer.score([s.response_ids for s in scored], [p for p, g in zip(problems, groups) for _ in g])
    for s, reward, ok in zip(scored, result.totals, result.correct):
        s.reward = reward
        out.correct[id(s)] = ok
    if result.example is not None:
        trainer.tracker.print_line(
            f"step {step}: {sum(result.failures.values())} reward "
            f"call(s) failed and scored 0, e.g. {result.example}"
        )
    out.generated += scored
    out.rewards = result if out.rewards is None else out.rewards + result
    if rc.overlong_buffer:
        lengths = torch.tensor([s.num_tokens for s in scored])
        penalties = overlong_penalty(lengths, rc.overlong_limit, rc.overlong_buffer)
        for s, penalty in zip(scored, penalties.tolist()):
            s.reward += penalty
    out.rounds += 1
    out.scored_groups += len(groups)
    if rc.dynamic_sampling:
        informative = informative_groups(torch.tensor([[s.reward for s in g] for g in groups]))
        out.dropped_groups += len(groups) - int(informative.sum())
        return [g if keep else None for g, keep in zip(groups, informative.tolist())]
    return groups


def number_groups(groups: list[list[Sample]]) -> None:
    """Each sample's group: its group's place in the batch."""
    for g, group in enumerate(groups):
        for s in group:
            s.group = g


def lag_metrics(rollouts: Rollouts, staleness: int) -> dict[str, float]:
    """The lag of the samples trained on (in RL steps): mean, max and its histogram
    (fraction per lag), and the samples dropped for too large a lag."""
    out = {"staleness/dropped_samples": rollouts.stale_samples}
    if rollouts.lags:
        lags = torch.tensor(rollouts.lags, dtype=torch.float)
        out.update({"staleness/lag_mean": lags.mean().item(), "staleness/lag_max": lags.max().item()})
        for lag in range(staleness + 1):
            out[f"staleness/lag_{lag}_frac"] = (lags == lag).float().mean().item()
    return out
