"""`rlpost train`: warm-up, then the RL loop, readable top to bottom.

    prompts -> rollout workers -> rewards -> advantages (algorithm)
      -> learners: old / reference log-probs, mini-batch updates
      -> weights pushed to the rollout workers -> metrics

Every random choice is seeded from (seed, step), so a resumed run repeats the
steps an uninterrupted one would have taken, and the in-process and Ray modes
take the same ones. Prompts are read from one seeded stream whose position is
checkpointed (dynamic sampling reads a varying number of prompts per step).
What the job shares with `rlpost cdpo` (model, Ray, worker groups, generation,
scoring, evaluation) is its `Session`; the controller's side of an update is in
update.py; where each step's rollouts come from (sent ahead with rollout.staleness, or
streamed) is pipeline.py or streaming.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from rlpost.algorithms import build_algorithm, sampling_rule_from_dict
from rlpost.algorithms.base import SamplingRule
from rlpost.config.rl import TrainConfig
from rlpost.data.batch import Sample
from rlpost.data.stream import EpochStream
from rlpost.jobs.colocation import Colocation
from rlpost.jobs.credit import CreditRoles
from rlpost.jobs.pipeline import GenerationPipeline, Rollouts, lag_metrics
from rlpost.jobs.run_dir import (
    Retention,
    failure_marked,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    save_checkpoint,
    save_final_model,
)
from rlpost.jobs.session import Session
from rlpost.jobs.streaming import Streaming
from rlpost.jobs.update import (
    assign_advantages,
    logprob_pass,
    minibatches,
    score_and_train,
    set_position_weights,
    set_token_mask,
    train_minibatches,
)
from rlpost.jobs.weights import WeightSync
from rlpost.rewards import Problem
from rlpost.tracking.metrics import MetricSums
from rlpost.tracking.step_times import time_metrics
from rlpost.tracking.tracker import Tracker
from rlpost.workers.learner import LRSchedule


@dataclass
class Result:
    run_dir: Path
    accuracy_before: float | None  # greedy, over every eval set; None: there is none
    accuracy_after: float | None


class Trainer(Session):
    """The RL job: a session on the task, plus the algorithm, the prompt stream and the
    sampling rule, the controller state a checkpoint carries."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        super().__init__(cfg, run_dir)
        self.algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.params())
        # the algorithm's per-token temperature for the next rollout batch (HAPO), if any
        self.sampling_rule: SamplingRule | None = None
        self.credit_roles = CreditRoles(self)
        rc = cfg.rollout
        # where each step's rollouts come from: sent ahead (k >= 0 steps), or streamed
        self.generation = (
            Streaming(self)
            if rc.staleness and rc.async_mode == "streaming"
            else GenerationPipeline(self, rc.staleness, cfg.steps)
        )

    def run(self) -> Result:
        cfg, run_dir = self.cfg, self.run_dir
        checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
        start_model = self.prepare(
            Tracker(run_dir, cfg, resume_step=checkpoint[1]["step"] if checkpoint else None),
            warmup_dir=run_dir / "models" / "warmup",
        )
        lc = cfg.learner
        optimizer_steps = (
            cfg.steps * lc.epochs * (cfg.rollout.prompts_per_step * cfg.rollout.n // lc.mini_batch_size)
        )
        self.learners = self.start_learners(
            start_model,
            (cfg.algorithm.name, cfg.algorithm.params()),
            LRSchedule(lc.lr, lc.lr_warmup_steps, lc.lr_schedule, total_steps=optimizer_steps),
        )
        self.credit_roles.start(start_model)
        self.start_rollout(start_model)
        self.weights = WeightSync(cfg, self.learners, self.rollout, self.use_ray)
        first = 1
        if checkpoint:
            self.load_checkpoint(*checkpoint)
            first = checkpoint[1]["step"] + 1
            self.tracker.print_line(f"resumed {run_dir} after step {first - 1}")
        if self.streaming is not None:
            self.streaming.start()
        after = None
        if not checkpoint:
            after = self.evaluate("step_0")
            if after:  # else no eval sets
                self.tracker.log(after, step=0)
        for step in range(first, cfg.steps + 1):
            metrics = self.rl_step(step)
            metrics.update(time_metrics(metrics, self.worker_compute_times(), cfg.rollout.staleness))
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                after = self.evaluate(f"step_{step}")
                metrics.update(after)
                self.credit_roles.write_view(run_dir / "credit", step)
            self.tracker.log(metrics, step=step)
            self.weights.check_gap(metrics, step)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                self.save_checkpoint(step)
        if after is None:  # resumed a run whose steps were all done
            after = self.evaluate(f"step_{cfg.steps}")
        save_final_model(run_dir, self.learners, self.tokenizer)
        self.shutdown()
        return Result(run_dir, self.accuracy_at_step_0(), after.get("eval/accuracy_greedy"))

    def rl_step(self, step: int) -> dict[str, float]:
        cfg, lc, needs = self.cfg, self.cfg.learner, self.algorithm.needs
        times = {"rollout": 0.0, "reward": 0.0}
        rollouts = self.collect(step, times)
        batch_metrics: dict[str, float] = {}
        if not rollouts.groups:  # dynamic sampling kept nothing: no update this step
            return step_metrics(cfg, rollouts, [], None, MetricSums(), times, batch_metrics)
        # engines and learners sharing GPUs take turns with the memory until the sync is done
        colocation = Colocation(cfg, self.learners, self.rollout)
        colocation.before_update()

        batch = [s for g in rollouts.groups for s in g]
        samples, statistics = self.credit(step, rollouts, batch, times, batch_metrics)

        t = time.perf_counter()
        batches = minibatches(samples, lc.mini_batch_size, lc.epochs, cfg.seed, step)
        if needs.values and step <= cfg.critic.warmup_steps:
            # the critic learns the values of the starting policy before the policy moves
            update, entropy, samples = [], None, []
        elif (
            needs.old_policy_entropy
            or needs.position_divergence
            or needs.logprobs_before_credit
            or lc.epochs > 1
            or rollouts.rule is not None
        ):
            # the controller needs the old policy's entropies before the update
            if statistics is None:
                statistics = logprob_pass(
                    self.learners, self.algorithm, samples, self.split, rollouts.rule, batch_metrics
                )
            entropy = statistics["entropy"]
            set_token_mask(self.algorithm, samples, entropy, step, cfg.rollout.mask_truncated, batch_metrics)
            if needs.position_divergence:
                set_position_weights(self.learners, self.algorithm, samples, batch_metrics)
            times["logprob"] = times.get("logprob", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            update = train_minibatches(self.learners, self.algorithm, batches, self.split)
        else:
            # nothing between the two passes needs the controller: one call per learner rank
            # scores its samples and trains on them (time/update covers both passes)
            set_token_mask(self.algorithm, samples, None, step, cfg.rollout.mask_truncated, batch_metrics)
            update, entropies = score_and_train(
                self.learners, self.algorithm, batches, self.split, needs.reference
            )
            entropy = torch.cat([entropies[id(s)] for s in samples])
        # the rule of the next rollout batch, from this batch's old-policy entropies
        if entropy is not None:
            self.sampling_rule = self.algorithm.sampling_rule(entropy)
        step_update = MetricSums()
        for merged in update:
            for k, v in merged.result().items():
                step_update.add_mean(k, v)
        times["update"] = time.perf_counter() - t
        if needs.values:
            t = time.perf_counter()
            self.credit_roles.train_critic(step, batch, batch_metrics)
            times["critic_update"] = time.perf_counter() - t
        colocation.after_update()

        t = time.perf_counter()
        self.sync_weights(step)
        times["weight_sync"] = time.perf_counter() - t
        colocation.after_sync(times)
        return step_metrics(cfg, rollouts, samples, entropy, step_update, times, batch_metrics)

    def credit(
        self, step: int, rollouts: Rollouts, batch: list[Sample], times: dict[str, float], metrics: dict
    ) -> tuple[list[Sample], dict | None]:
        """Each sample's advantages (`CreditRoles.credit`), and the samples that train (the
        algorithm's selection); also the old policy's log-prob pass over them when the credit
        read it first (None otherwise)."""
        statistics, needs = None, self.algorithm.needs
        if needs.logprobs_before_credit:
            t = time.perf_counter()
            collision = needs.token_collision
            statistics = logprob_pass(
                self.learners, self.algorithm, batch, self.split, rollouts.rule, metrics, collision
            )
            times["logprob"] = time.perf_counter() - t
        t = time.perf_counter()
        credit = self.credit_roles.credit(step, batch, rollouts, statistics, times, metrics)
        assign_advantages(batch, credit.advantages)
        self.credit_roles.keep_for_view(batch)
        keep = self.algorithm.select_samples(credit.advantages, step)
        samples = batch
        if keep is not None:
            samples = [s for s, kept in zip(batch, keep.flatten().tolist()) if kept]
            metrics["selection/sample_frac"] = len(samples) / len(batch)
            statistics = None  # over the whole batch: the update's pass is over `samples`
        times["reward"] += time.perf_counter() - t - times.get("credit", 0.0)
        return samples, statistics

    def collect(self, step: int, times: dict[str, float]) -> Rollouts:
        """Generate (or take what was generated) and score this step's groups."""
        return self.generation.collect(step, times)

    @cached_property
    def stream(self) -> EpochStream:
        """The order of the training prompts, made when first read: files' prompts are
        there only once `prepare` has read them."""
        return EpochStream(len(self.train_problems), self.cfg.seed)

    def take_prompts(self, count: int) -> list[Problem]:
        """The next `count` problems of the stream of seeded epoch orders."""
        return [self.train_problems[i] for i in self.stream.take(count)]

    def sync_weights(self, step: int) -> None:
        """The learners' weights after `step` into the rollout workers."""
        self.generation.sync(step)

    # ----- checkpoints: the stream's position, the sampling rule, the batches sent ahead -------
    def save_checkpoint(self, step: int) -> None:
        rule = self.sampling_rule
        if self.streaming is not None:  # the stream's position holds still while it is written
            self.streaming.feeder.pause()
        save_checkpoint(
            self.run_dir,
            self.learners,
            step,
            {
                "data_position": self.stream.position,
                "sampling_rule": rule.to_dict() if rule is not None else None,
                # the steps of the weights that sampled the batches sent ahead (their lags)
                "weight_steps": self.weights.recent_steps(self.cfg.rollout.staleness + 2),
                "algorithm_state": self.algorithm.state_dict(),  # CEEH's per-question statistics
            },
            lambda tag_dir: (self.generation.save(tag_dir), self.credit_roles.save(tag_dir)),
            Retention.of(self.cfg),
        )
        if self.streaming is not None:
            self.streaming.feeder.resume()
        self.tracker.plot()

    def load_checkpoint(self, tag: str, state: dict) -> None:
        load_checkpoint(self.run_dir, self.learners, tag, state)
        self.stream.position = state["data_position"]
        rule = state.get("sampling_rule")  # absent in checkpoints before HAPO sampling
        self.sampling_rule = sampling_rule_from_dict(rule) if rule is not None else None
        self.weights.steps.update({int(v): s for v, s in state.get("weight_steps", {}).items()})
        self.algorithm.load_state_dict(state.get("algorithm_state", {}))
        self.sync_weights(state["step"])
        tag_dir = self.run_dir / "checkpoints" / tag
        self.generation.load(tag_dir, state["step"])
        self.credit_roles.load(tag_dir)

    @property
    def streaming(self) -> Streaming | None:
        return self.generation if isinstance(self.generation, Streaming) else None

    def worker_compute_times(self) -> dict[str, list[dict[str, float]]]:
        if self.streaming is None:
            return super().worker_compute_times()
        # the rollout workers are asked through the feeder, which is never behind a generation
        learners = self.learners.call("take_compute_times")
        return {"rollout": self.streaming.feeder.take_busy(), "learner": learners}

    def shutdown(self) -> None:
        if self.streaming is not None:
            self.streaming.stop()
        self.credit_roles.shutdown()
        super().shutdown()
        if self.tracker is not None:
            self.tracker.close()

    def accuracy_at_step_0(self) -> float | None:
        """Greedy accuracy before RL, from metrics.jsonl (it survives resumes)."""
        with open(self.run_dir / "metrics.jsonl") as f:
            rows = (json.loads(line) for line in f)
            return next((r.get("eval/accuracy_greedy") for r in rows if r["step"] == 0), None)


def length_by_correctness(lengths: torch.Tensor, correct: list[bool]) -> dict[str, float]:
    """Mean length of correct and of incorrect responses (each where there is one), and
    `incorrect_minus_correct`: the mean over groups holding both of the difference of
    their means, the within-group sign-length coupling that balanced aggregation
    corrects (lengths: [groups, n], correct in the same order)."""
    ok = torch.tensor(correct, dtype=torch.bool).view(lengths.shape)
    out = {}
    if ok.any():
        out["response_length/correct"] = lengths[ok].mean().item()
    if not ok.all():
        out["response_length/incorrect"] = lengths[~ok].mean().item()
    mixed = ok.any(1) & (~ok).any(1)
    if mixed.any():
        sums, counts = lengths * ok, ok.sum(1)
        gap = (lengths.sum(1) - sums.sum(1)) / (ok.shape[1] - counts) - sums.sum(1) / counts
        out["response_length/incorrect_minus_correct"] = gap[mixed].mean().item()
    return out


def step_metrics(
    cfg: TrainConfig,
    rollouts: Rollouts,
    samples: list[Sample],
    entropy: torch.Tensor | None,
    update: MetricSums,
    times: dict[str, float],
    batch_metrics: dict[str, float],
) -> dict[str, float]:
    """Rewards, accuracy and lengths over every sample generated and scored in the step
    (the policy's behaviour; streaming may train on groups scored in earlier steps only,
    and then has none); entropy and log-prob gaps over the samples trained on."""
    rc = cfg.rollout
    generated = rollouts.generated
    lengths = torch.tensor([s.num_tokens for s in generated], dtype=torch.float)
    n_tokens = int(lengths.sum())
    step_time = sum(times.values())
    out = {"tokens": n_tokens, "tokens_per_sec": n_tokens / step_time, "time/step": step_time}
    if generated:
        rewards = torch.tensor([s.reward for s in generated])
        out.update(
            {
                "reward/mean": rewards.mean().item(),
                "reward/std": rewards.std().item() if len(generated) > 1 else 0.0,
                "response_length/mean": lengths.mean().item(),
                "response_length/max": lengths.max().item(),
                "response_length/clipped_frac": sum(s.truncated for s in generated) / len(generated),
            }
        )
        result = rollouts.rewards
        out.update(result.metrics(per_source=cfg.from_files))
        out.update(length_by_correctness(lengths.view(-1, rc.n), result.correct))
        if not cfg.from_files:  # one source, the task
            out[f"accuracy/{cfg.task.name}"] = sum(result.correct) / len(generated)
        if rc.overlong_buffer:  # collect added the penalty to each pool reward
            out["overlong/penalty_mean"] = sum(
                s.reward - total for s, total in zip(generated, result.totals)
            ) / len(generated)
    if samples:
        gap = torch.cat([(torch.tensor(s.rollout_logp) - s.old_logp).abs() for s in samples])
        out.update(
            {
                "rollout_entropy": entropy.mean().item(),
                "logprob_gap/rollout_vs_learner_mean": gap.mean().item(),
                "logprob_gap/rollout_vs_learner_max": gap.max().item(),
            }
        )
    if rc.staleness:
        out.update(lag_metrics(rollouts, rc.staleness))
    if rc.dynamic_sampling:
        out["dynamic_sampling/dropped_group_frac"] = rollouts.dropped_groups / max(rollouts.scored_groups, 1)
        if not (rc.staleness and rc.async_mode == "streaming"):  # streaming has no rounds
            out["dynamic_sampling/extra_rounds"] = rollouts.rounds - 1
        out["dynamic_sampling/kept_groups"] = len(rollouts.groups)
    out.update(batch_metrics)
    out.update({f"time/{k}": v for k, v in times.items()})
    out.update(update.result())
    return out


def train(cfg: TrainConfig) -> Result:
    """The RL job in a new run directory (or `cfg.resume`'s). Input refused before any worker
    starts (a bad data file, ...) leaves no directory; a later failure marks it (FAILED)."""
    run_dir = prepare_run_dir(cfg)
    trainer = None
    with failure_marked(run_dir, not cfg.resume, lambda: trainer is not None and trainer.started):
        trainer = Trainer(cfg, run_dir)
        try:
            return trainer.run()
        finally:
            trainer.shutdown()
