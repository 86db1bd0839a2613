"""The controller: warm-up, then the RL loop, readable top to bottom.

    prompts -> rollout workers -> rewards -> advantages (algorithm)
      -> learners: old / reference log-probs, mini-batch updates
      -> weights pushed to the rollout workers -> metrics

Every random choice is seeded from (seed, step), so a resumed run repeats the
steps an uninterrupted one would have taken, and the in-process and Ray modes
take the same ones. Prompts are read from one seeded stream whose position is
checkpointed (dynamic sampling reads a varying number of prompts per step).
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.base import TOKEN_MASK, TOKEN_SCALE
from rlpost.algorithms.dapo import informative_groups, overlong_penalty
from rlpost.algorithms.hapo import TemperatureRule
from rlpost.data.batch import Sample, Shard, per_sample, plan, repeat, shard, view
from rlpost.config.load import dump_config
from rlpost.config.rl import TrainConfig
from rlpost.config.sections import RayConfig, TaskConfig
from rlpost.errors import ConfigError
from rlpost.files import write_json
from rlpost.tracking.metrics import MetricSums
from rlpost.model.load import load_tokenizer, materialise_initial_model
from rlpost.rewards import Problem, build_task
from rlpost.rewards.config import ComponentConfig, RewardConfig
from rlpost.rewards.pool import RewardPool, RewardResult
from rlpost.tracking.tracker import Tracker
from rlpost.workers.group import Placement, WorkerGroup
from rlpost.workers.learner import LRSchedule, checkpoint_tags, set_threads, start_learner_group
from rlpost.workers.rollout import RolloutWorker


VERIFIER = "task"  # key of the task's own score among the reward components


def derive_seed(*parts) -> int:
    return random.Random(":".join(map(str, parts))).randrange(2**31)


@dataclass
class Result:
    run_dir: Path
    accuracy_before: float
    accuracy_after: float


@dataclass
class Rollouts:
    """What one RL step generated: the groups it trains on and, for metrics, every
    scored sample of every generation round."""

    groups: list[list[Sample]] = field(default_factory=list)  # rollout.n samples each
    generated: list[Sample] = field(default_factory=list)
    rewards: RewardResult | None = None  # of every generated sample, before overlong shaping
    rounds: int = 0
    dropped_groups: int = 0  # by dynamic sampling


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.use_ray = cfg.mode == "ray"
        self.task = build_task(cfg.task.name, cfg.task.args)
        self.train_problems = self.task.problems(cfg.task.train_size, seed=cfg.seed)
        seen = {p.prompt for p in self.train_problems}
        held_out = self.task.problems(cfg.task.eval_size * 4, seed=derive_seed(cfg.seed, "eval"))
        self.eval_problems = [p for p in held_out if p.prompt not in seen][:cfg.task.eval_size]
        if not self.eval_problems:
            raise ConfigError(f"key 'task.train_size': the {len(seen)} distinct training problems "
                              f"include every problem the task generated for evaluation; lower "
                              f"task.train_size or make the task larger (task.args)")
        self.algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.params())
        self.tracker: Tracker | None = None
        self._orders: dict[int, list[int]] = {}
        self._prompt_ids: dict[str, list[int]] = {}
        self.data_position = 0  # prompts taken from the epoch stream so far
        # the algorithm's per-token temperature for the next rollout batch (HAPO), if any
        self.sampling_rule: TemperatureRule | None = None
        self.rollout: WorkerGroup | None = None
        self.learners: WorkerGroup | None = None
        self.rewards: RewardPool | None = None
        self.placement: Placement | None = None

    # ----- prompts and rewards -------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt (memoised: every RL step encodes its prompts for the
        engines and again for the samples; callers must not modify the list)."""
        ids = self._prompt_ids.get(text)
        if ids is None:
            ids = self._prompt_ids[text] = encode_prompt(self.tokenizer, text, self.cfg.task)
        return ids

    def score(self, responses: list[list[int]], problems: list[Problem]) -> RewardResult:
        """Rewards of responses (token ids) through the reward pool; responses of the
        round that raise or time out score 0 and are reported in the result."""
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return self.rewards.score(texts, problems, lengths=[len(r) for r in responses])

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.train_problems)))
            random.Random(derive_seed(self.cfg.seed, "epoch", epoch)).shuffle(order)
            self._orders = {epoch: order}  # steps only move forward: keep one epoch
        return self._orders[epoch]

    def take_prompts(self, count: int) -> list[Problem]:
        """The next `count` problems of the stream of seeded epoch orders."""
        start, self.data_position = self.data_position, self.data_position + count
        positions = [divmod(pos, len(self.train_problems)) for pos in range(start, start + count)]
        return [self.train_problems[self.epoch_order(epoch)[idx]] for epoch, idx in positions]

    def generate(self, problems: list[Problem], n: int, temperature: float, seed: int,
                 rule: TemperatureRule | None = None) -> list[list]:
        prompts = [self.encode_prompt(p.prompt) for p in problems]
        workers = len(self.rollout)
        per = -(-len(prompts) // workers)
        chunks = [(prompts[r * per:(r + 1) * per], n, temperature, self.cfg.rollout.top_p,
                   self.cfg.rollout.max_new_tokens, derive_seed(seed, r), rule)
                  for r in range(workers)]
        return [c for part in self.rollout.call("generate", per_rank=chunks) for c in part]

    # ----- stages --------------------------------------------------------------
    def start_learners(self, model_dir: Path, algorithm: tuple[str, dict],
                       schedule: LRSchedule) -> WorkerGroup:
        group = start_learner_group(self.cfg, model_dir, algorithm, schedule,
                                    pad_id=self.tokenizer.pad_token_id, use_ray=self.use_ray,
                                    slots=self.placement.slots("learner"))
        self.packed = group.call("is_packed")[0]  # micro-batch budgets count tokens differently
        return group

    def warmup(self, model_dir: Path, out_dir: Path) -> None:
        """Supervised warm-up on the task's demonstrations; writes a HF model to out_dir."""
        wc = self.cfg.warmup
        sft = build_algorithm("sft", {})
        learners = self.start_learners(model_dir, ("sft", {}), LRSchedule(
            wc.lr, wc.lr_warmup_steps, wc.lr_schedule, total_steps=wc.steps))
        rng = random.Random(derive_seed(self.cfg.seed, "warmup"))
        eos = self.tokenizer.eos_token_id
        t0 = time.time()
        for step in range(1, wc.steps + 1):
            batch = [Sample(prompt_ids=self.encode_prompt(p.prompt),
                            response_ids=self.tokenizer.encode(self.task.demonstration(p, rng),
                                                               add_special_tokens=False) + [eos])
                     for p in rng.sample(self.train_problems, wc.batch_size)]
            (merged,) = train_minibatches(learners, sft, [batch], self.shard)
            if step % max(1, wc.steps // 10) == 0 or step == wc.steps:
                nll = merged.result()["loss"]
                self.tracker.print_line(f"warm-up {step}/{wc.steps} | nll {nll:.3f} | "
                                        f"{time.time() - t0:.0f}s")
        learners.call("save_pretrained", str(out_dir))
        learners.shutdown()
        self.tokenizer.save_pretrained(out_dir)

    def shard(self, samples: list[Sample]) -> list[list[list[Sample]]]:
        lc = self.cfg.learner
        return shard(samples, lc.num_learners, lc.micro_batch_tokens, lc.micro_batch_size,
                     self.packed)

    def evaluate(self) -> dict[str, float]:
        problems = self.eval_problems
        seed = derive_seed(self.cfg.seed, "eval-sample")
        greedy = self.generate(problems, 1, 0.0, seed)
        sampled = self.generate(problems, 1, self.cfg.rollout.temperature, seed)
        self.compute_times()  # evaluation's generation counts in no RL step

        def acc(groups):
            correct = self.score([g[0].ids for g in groups], problems).components[VERIFIER]
            return sum(correct) / len(problems)

        return {"eval/accuracy_greedy": acc(greedy), "eval/accuracy_sampled": acc(sampled)}

    # ----- the RL step ---------------------------------------------------------
    def collect(self, step: int, times: dict[str, float]) -> Rollouts:
        """Generate and score this step's groups. With dynamic sampling, groups whose
        rewards are all equal are dropped and further rounds of prompts_per_step
        prompts are generated, at most max_extra_rounds, until prompts_per_step
        groups are kept; surplus groups are discarded and a short batch trains as
        it is."""
        cfg, rc = self.cfg, self.cfg.rollout
        out = Rollouts()
        for extra in range(1 + (rc.max_extra_rounds if rc.dynamic_sampling else 0)):
            t = time.perf_counter()
            problems = self.take_prompts(rc.prompts_per_step)
            # the first round keeps the seed of a run without dynamic sampling
            seed = derive_seed(cfg.seed, "rollout", step, *(("round", extra) if extra else ()))
            completions = self.generate(problems, rc.n, rc.temperature, seed, self.sampling_rule)
            times["rollout"] += time.perf_counter() - t

            t = time.perf_counter()
            groups = [[Sample(prompt_ids=self.encode_prompt(p.prompt), response_ids=c.ids,
                              truncated=c.truncated, rollout_logp=c.logprobs) for c in group]
                      for p, group in zip(problems, completions)]
            scored = [s for g in groups for s in g]
            result = self.score([s.response_ids for s in scored],
                                [p for p, g in zip(problems, groups) for _ in g])
            for s, reward in zip(scored, result.totals):
                s.reward = reward
            if result.example is not None:
                self.tracker.print_line(f"step {step}: {sum(result.failures.values())} reward "
                                        f"call(s) failed and scored 0, e.g. {result.example}")
            out.generated += scored
            out.rewards = result if out.rewards is None else out.rewards + result
            if rc.overlong_buffer:
                lengths = torch.tensor([s.num_tokens for s in scored])
                penalties = overlong_penalty(lengths, rc.overlong_limit, rc.overlong_buffer)
                for s, penalty in zip(scored, penalties.tolist()):
                    s.reward += penalty
            out.rounds += 1
            if rc.dynamic_sampling:
                informative = informative_groups(torch.tensor([[s.reward for s in g] for g in groups]))
                out.dropped_groups += len(groups) - int(informative.sum())
                groups = [g for g, keep in zip(groups, informative.tolist()) if keep]
            out.groups += groups
            times["reward"] += time.perf_counter() - t
            if len(out.groups) >= rc.prompts_per_step:
                break
        if len(out.groups) < rc.prompts_per_step:
            self.tracker.print_line(f"step {step}: dynamic sampling kept {len(out.groups)} of "
                                    f"{rc.prompts_per_step} groups after {out.rounds - 1} extra "
                                    f"rounds; training on those")
        out.groups = out.groups[:rc.prompts_per_step]
        for g, group in enumerate(out.groups):
            for s in group:
                s.group = g
        return out

    def rl_step(self, step: int) -> dict[str, float]:
        cfg, lc = self.cfg, self.cfg.learner
        times = {"rollout": 0.0, "reward": 0.0}
        rollouts = self.collect(step, times)
        batch_metrics: dict[str, float] = {}
        if not rollouts.groups:  # dynamic sampling kept nothing: no update this step
            return self.step_metrics(rollouts, [], None, MetricSums(), times, batch_metrics)

        t = time.perf_counter()
        batch = [s for g in rollouts.groups for s in g]
        shape = (len(rollouts.groups), cfg.rollout.n)
        rewards = torch.tensor([s.reward for s in batch]).view(shape)
        lengths = torch.tensor([s.num_tokens for s in batch]).view(shape)
        advantages = self.algorithm.advantages(rewards, lengths)
        for s, a in zip(batch, advantages.flatten().tolist()):
            s.advantages = torch.full((s.num_tokens,), a)
        keep = self.algorithm.select_samples(advantages, step)
        samples = batch
        if keep is not None:
            samples = [s for s, kept in zip(batch, keep.flatten().tolist()) if kept]
            batch_metrics["selection/sample_frac"] = len(samples) / len(batch)
        times["reward"] += time.perf_counter() - t

        needs = self.algorithm.needs
        t = time.perf_counter()
        if (needs.old_policy_entropy or needs.position_divergence or lc.epochs > 1
                or self.sampling_rule is not None):
            entropy = self.logprob_pass(samples, step, batch_metrics)
            times["logprob"] = time.perf_counter() - t
            t = time.perf_counter()
            update = train_minibatches(self.learners, self.algorithm, self.minibatches(samples, step),
                                       self.shard)
        else:
            # nothing between the two passes needs the controller: one call per learner rank
            # scores its samples and trains on them (time/update covers both passes)
            self.set_token_mask(samples, None, step, batch_metrics)
            update, entropies = score_and_train(self.learners, self.algorithm,
                                                self.minibatches(samples, step), self.shard,
                                                needs.reference)
            entropy = torch.cat([entropies[id(s)] for s in samples])
            self.sampling_rule = self.algorithm.sampling_rule(entropy)
        step_update = MetricSums()
        for merged in update:
            for k, v in merged.result().items():
                step_update.add_mean(k, v)
        times["update"] = time.perf_counter() - t

        t = time.perf_counter()
        self.sync_weights()
        times["weight_sync"] = time.perf_counter() - t
        return self.step_metrics(rollouts, samples, entropy, step_update, times, batch_metrics)

    def logprob_pass(self, samples: list[Sample], step: int, batch_metrics: dict[str, float]) -> torch.Tensor:
        """The log-prob pass, and what the controller derives from its entropies before the
        update (token inputs, token mask, TW-GRPO's position weights, the next sampling
        rule). Returns the entropies, flat in the order of `samples`."""
        parts = self.shard(samples)
        rule = self.sampling_rule  # the rule these samples were drawn under
        results = self.learners.call("logprobs", per_rank=[(p, self.algorithm.needs.reference, rule)
                                                           for p in parts])
        entropies = {}
        for rank, r in zip(parts, results):  # each rank's results are flat in its shard's order
            ordered = [s for micro in rank for s in micro]
            split = per_sample(r, ordered)
            for s, lp, h, ref, temp in zip(ordered, split["logp"], split["entropy"], split["ref_logp"],
                                           split["temperature"]):
                s.old_logp, s.ref_logp, s.temperature = lp, ref, temp
                entropies[id(s)] = h
        entropy = torch.cat([entropies[id(s)] for s in samples])
        if rule is not None:
            temps = torch.cat([s.temperature for s in samples])
            batch_metrics.update({"sampling/temperature_mean": temps.mean().item(),
                                  "sampling/temperature_min": temps.min().item(),
                                  "sampling/temperature_max": temps.max().item()})
        self.sampling_rule = self.algorithm.sampling_rule(entropy)
        for name, values in self.algorithm.token_inputs(entropy).items():
            for s, v in zip(samples, values.split([s.num_tokens for s in samples])):
                s.extra[name] = v
        self.set_token_mask(samples, entropy, step, batch_metrics)
        if self.algorithm.needs.position_divergence:
            scale = self.set_position_weights(list(groups_of(samples).values()))
            batch_metrics["selection/position_weight_mean"] = scale.mean().item()
        return entropy

    def set_token_mask(self, samples: list[Sample], entropy: torch.Tensor | None, step: int,
                       batch_metrics: dict[str, float]) -> None:
        """The algorithm's token selection and the runtime's valid tokens, on each sample."""
        sizes = [s.num_tokens for s in samples]
        valid = None
        if self.cfg.rollout.mask_truncated:
            valid = repeat(torch.tensor([not s.truncated for s in samples]), torch.tensor(sizes))
        mask = self.algorithm.token_mask(entropy, torch.cat([s.advantages for s in samples]), valid, step)
        if mask is not None:
            for s, m in zip(samples, mask.split(sizes)):
                s.extra[TOKEN_MASK] = m
            batch_metrics["selection/token_frac"] = mask.double().mean().item()

    def minibatches(self, samples: list[Sample], step: int) -> list[list[Sample]]:
        """Each epoch's mini-batches: whole groups, shuffled, cut into mini_batch_size."""
        lc = self.cfg.learner
        groups = list(groups_of(samples).values())
        out = []
        for epoch in range(lc.epochs):
            order = list(range(len(groups)))
            random.Random(derive_seed(self.cfg.seed, "shuffle", step, epoch)).shuffle(order)
            shuffled = [s for g in order for s in groups[g]]
            out += [shuffled[start:start + lc.mini_batch_size]
                    for start in range(0, len(shuffled), lc.mini_batch_size)]
        return out

    def set_position_weights(self, groups: list[list[Sample]]) -> torch.Tensor:
        """TW-GRPO: each group's position divergences from the learners (whole groups
        per rank, balanced by tokens), turned into the weights of its tokens. Returns
        all the weights set."""
        lengths = [sum(len(s.prompt_ids) + s.num_tokens for s in g) for g in groups]
        parts = [Shard(groups[i] for micro in rank for i in micro)
                 for rank in plan(lengths, len(self.learners))]
        results = self.learners.call("position_divergence", per_rank=[(p,) for p in parts])
        scales = []
        for part, divergences in zip(parts, results):
            for group, divergence in zip(part, divergences):
                weights = self.algorithm.position_weights(divergence)
                for s in group:
                    s.extra[TOKEN_SCALE] = weights[:s.num_tokens]
                    scales.append(s.extra[TOKEN_SCALE])
        return torch.cat(scales)

    def compute_times(self) -> dict[str, float]:
        """Seconds of generation, log-prob forward and update compute since the last
        call, each from the slowest worker: a group's workers run in parallel."""
        out: dict[str, float] = {}
        for group in (self.rollout, self.learners):
            for seconds in group.call("take_compute_times") if group is not None else ():
                for name, value in seconds.items():
                    out[name] = max(out.get(name, 0.0), value)
        return out

    def sync_weights(self) -> None:
        weights = self.learners.call("put_weights" if self.use_ray else "export_weights")[0]
        self.rollout.call("update_weights", weights)

    def step_metrics(self, rollouts: Rollouts, samples: list[Sample], entropy: torch.Tensor | None,
                     update: MetricSums, times: dict[str, float],
                     batch_metrics: dict[str, float]) -> dict[str, float]:
        """Rewards, accuracy and lengths over every generated sample (the policy's
        behaviour); entropy and log-prob gaps over the samples trained on."""
        rc = self.cfg.rollout
        generated = rollouts.generated
        rewards = torch.tensor([s.reward for s in generated])
        lengths = torch.tensor([s.num_tokens for s in generated], dtype=torch.float)
        n_tokens = int(lengths.sum())
        step_time = sum(times.values())
        out = {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(generated) > 1 else 0.0,
            f"accuracy/{self.cfg.task.name}":
                sum(v == 1 for v in rollouts.rewards.components[VERIFIER]) / len(generated),
            "response_length/mean": lengths.mean().item(),
            "response_length/max": lengths.max().item(),
            "response_length/clipped_frac": sum(s.truncated for s in generated) / len(generated),
            "tokens": n_tokens,
            "tokens_per_sec": n_tokens / step_time,
            "time/step": step_time,
        }
        if samples:
            gap = torch.cat([(torch.tensor(s.rollout_logp) - s.old_logp).abs() for s in samples])
            out.update({"rollout_entropy": entropy.mean().item(),
                        "logprob_gap/rollout_vs_learner_mean": gap.mean().item(),
                        "logprob_gap/rollout_vs_learner_max": gap.max().item()})
        out.update(rollouts.rewards.metrics())
        if rc.overlong_buffer:  # collect added the penalty to each pool reward
            out["overlong/penalty_mean"] = sum(s.reward - total for s, total in
                                               zip(generated, rollouts.rewards.totals)) / len(generated)
        if rc.dynamic_sampling:
            out["dynamic_sampling/dropped_group_frac"] = (
                rollouts.dropped_groups / (rollouts.rounds * rc.prompts_per_step))
            out["dynamic_sampling/extra_rounds"] = rollouts.rounds - 1
            out["dynamic_sampling/kept_groups"] = len(rollouts.groups)
        out.update(batch_metrics)
        out.update({f"time/{k}": v for k, v in times.items()})
        out.update(update.result())
        return out

    # ----- checkpoints -----------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        ckpt_dir = self.run_dir / "checkpoints"
        tag = f"step_{step}"
        self.learners.call("save_checkpoint", str(ckpt_dir), tag)
        rule = self.sampling_rule
        write_trainer_state(ckpt_dir / tag, {"step": step,
                                             "data_position": self.data_position,
                                             "sampling_rule": rule.to_dict() if rule is not None else None})
        self.tracker.plot()

    def load_checkpoint(self, tag: str, state: dict) -> None:
        self.learners.call("load_checkpoint", str(self.run_dir / "checkpoints"), tag)
        restore_rng(state)
        self.data_position = state["data_position"]
        rule = state.get("sampling_rule")  # absent in checkpoints before HAPO sampling
        self.sampling_rule = TemperatureRule.from_dict(rule) if rule is not None else None
        self.sync_weights()

    # ----- the whole job -----------------------------------------------------------
    def prepare(self, tracker: Tracker, warmup_dir: Path) -> Path:
        """Everything before the first learner of the job: the initial model and its
        tokenizer, Ray, the placement, the reward pool, and the warm-up (skipped when
        `warmup_dir` holds a finished one). Returns the starting policy's directory."""
        cfg = self.cfg
        set_threads()
        initial = materialise_initial_model(cfg.model, self.task.alphabet, cfg.seed,
                                            self.run_dir / "models" / "initial")
        self.tokenizer = load_tokenizer(initial)
        self.tracker = tracker
        if self.use_ray:
            self.start_ray()
        # before the warm-up: its learners and the job's learners take the same slots
        self.placement = Placement(cfg, use_ray=self.use_ray)
        self.rewards = RewardPool(with_verifier(cfg.reward), self.task, use_ray=self.use_ray)
        if not cfg.warmup.steps:
            return initial
        if not (warmup_dir / "tokenizer_config.json").is_file():  # written last
            self.warmup(initial, warmup_dir)
        return warmup_dir

    def start_rollout(self, model_dir: Path) -> WorkerGroup:
        cfg = self.cfg
        self.rollout = WorkerGroup(
            RolloutWorker, cfg.rollout.num_workers,
            lambda rank: dict(model_dir=str(model_dir), cfg=cfg.rollout, dtype=cfg.model.dtype,
                              seed=cfg.seed, rank=rank),
            use_ray=self.use_ray, slots=self.placement.slots("rollout"))
        return self.rollout

    def run(self) -> Result:
        cfg, run_dir = self.cfg, self.run_dir
        checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
        start_model = self.prepare(
            Tracker(run_dir, cfg, resume_step=checkpoint[1]["step"] if checkpoint else None),
            warmup_dir=run_dir / "models" / "warmup")
        lc = cfg.learner
        optimizer_steps = cfg.steps * lc.epochs * (cfg.rollout.prompts_per_step * cfg.rollout.n
                                                   // lc.mini_batch_size)
        self.learners = self.start_learners(
            start_model, (cfg.algorithm.name, cfg.algorithm.params()),
            LRSchedule(lc.lr, lc.lr_warmup_steps, lc.lr_schedule, total_steps=optimizer_steps))
        self.start_rollout(start_model)
        first = 1
        if checkpoint:
            self.load_checkpoint(*checkpoint)
            first = checkpoint[1]["step"] + 1
            self.tracker.print_line(f"resumed {run_dir} after step {first - 1}")
        after = None
        if not checkpoint:
            after = self.evaluate()
            self.tracker.log(after, step=0)
        for step in range(first, cfg.steps + 1):
            metrics = self.rl_step(step)
            metrics.update(overhead_metrics(metrics, self.compute_times()))
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                after = self.evaluate()
                metrics.update(after)
            self.tracker.log(metrics, step=step)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                self.save_checkpoint(step)
        if after is None:  # resumed a run whose steps were all done
            after = self.evaluate()
        final = run_dir / "final_model"
        self.learners.call("save_pretrained", str(final))
        self.tokenizer.save_pretrained(final)
        self.shutdown()
        return Result(run_dir, self.accuracy_at_step_0(), after["eval/accuracy_greedy"])

    def accuracy_at_step_0(self) -> float:
        """Greedy accuracy before RL, from metrics.jsonl (it survives resumes)."""
        with open(self.run_dir / "metrics.jsonl") as f:
            rows = (json.loads(line) for line in f)
            return next(r["eval/accuracy_greedy"] for r in rows if r["step"] == 0)

    def start_ray(self) -> None:
        init_ray(self.cfg.ray, self.cfg.rollout.num_workers + self.cfg.learner.num_learners)

    def shutdown(self) -> None:
        for group in (self.rollout, self.learners):
            if group is not None:
                group.shutdown()
        self.rollout = self.learners = None
        if self.placement is not None:
            self.placement.shutdown()
            self.placement = None
        if self.rewards is not None:
            self.rewards.close()
            self.rewards = None
        if self.tracker is not None:
            self.tracker.close()


def prompt_record(tokenizer, text: str, task: TaskConfig) -> str | list[dict[str, str]]:
    """A problem as a prompt of the offline data formats (rlpost/preference_data.py), which
    tokenize it as `encode_prompt` does: with the tokenizer's chat template
    (task.chat_template on, or auto and the tokenizer has one) a user message after
    task.system_prompt as a system message; else text, the system prompt and a blank line
    before the problem."""
    use_template = task.chat_template == "on" or (task.chat_template == "auto"
                                                  and bool(getattr(tokenizer, "chat_template", None)))
    if use_template:
        messages = [{"role": "user", "content": text}]
        if task.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": task.system_prompt})
        return messages
    return text if task.system_prompt is None else f"{task.system_prompt}\n\n{text}"


def encode_prompt(tokenizer, text: str, task: TaskConfig) -> list[int]:
    """Token ids of a problem's `prompt_record`: a conversation rendered by the chat
    template with the assistant's generation prompt, or BOS and the text."""
    prompt = prompt_record(tokenizer, text, task)
    if isinstance(prompt, list):
        rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        # the template writes its own special tokens (BOS included, where it has one)
        return tokenizer.encode(rendered, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + tokenizer.encode(prompt, add_special_tokens=False)


def groups_of(samples: list[Sample]) -> dict[int, list[Sample]]:
    """The samples by group, groups in order of first appearance."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    return groups


def weighted_minibatches(algorithm, minibatches: list[list[Sample]], shard
                         ) -> tuple[list[tuple], list[list[list[list[Sample]]]], dict[int, Sample]]:
    """Each mini-batch's aggregation weights over the whole mini-batch, and its copies of
    the samples carrying them ([mini-batch][rank][micro][Sample], cut by `shard`): a sample
    in several mini-batches (epochs > 1) has other weights in each. Also each copy's
    original, by id of the copy."""
    views, parts, originals = [], [], {}
    for samples in minibatches:
        batch = view(samples)
        weights = algorithm.token_weights(batch)
        copies = [replace(s, weights=w) for s, w in zip(samples, weights.split([s.num_tokens for s in samples]))]
        originals.update((id(c), s) for c, s in zip(copies, samples))
        parts.append(shard(copies))
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


def train_minibatches(learners: WorkerGroup, algorithm, minibatches: list[list[Sample]],
                      shard: Callable[[list[Sample]], list[list[list[Sample]]]]) -> list[MetricSums]:
    """One optimizer step per mini-batch: aggregation weights over each whole mini-batch,
    then each split across learner ranks and micro-batches by `shard`. One call per rank
    takes them all: the weights depend on the samples alone, not on the policy the earlier
    steps leave, and each call to a Ray actor costs milliseconds."""
    views, parts, _ = weighted_minibatches(algorithm, minibatches, shard)
    results = learners.call("train_minibatches",
                            per_rank=[([p[rank] for p in parts],) for rank in range(len(learners))])
    return merged_metrics(algorithm, views, results)


def score_and_train(learners: WorkerGroup, algorithm, minibatches: list[list[Sample]], shard,
                    with_ref: bool) -> tuple[list[MetricSums], dict[int, torch.Tensor]]:
    """`train_minibatches` with the log-prob pass in the same learner call
    (`Learner.score_and_train`; one epoch: each sample in one mini-batch). Sets each
    sample's old_logp (and ref_logp) as the learner scored it; returns the metrics and
    the entropies by id of the sample."""
    views, parts, originals = weighted_minibatches(algorithm, minibatches, shard)
    results = learners.call("score_and_train", per_rank=[([p[rank] for p in parts], with_ref)
                                                         for rank in range(len(learners))])
    entropies = {}
    for rank, (scores, _) in enumerate(results):
        copies = [c for p in parts for micro in p[rank] for c in micro]
        split = per_sample(scores, copies)
        for c, lp, h, ref in zip(copies, split["logp"], split["entropy"], split["ref_logp"]):
            s = originals[id(c)]
            s.old_logp, s.ref_logp = lp, ref
            entropies[id(s)] = h
    return merged_metrics(algorithm, views, [metrics for _, metrics in results]), entropies


def with_verifier(reward: RewardConfig) -> RewardConfig:
    """The configured reward, plus the task's own verifier at weight 0 when it is not one
    of the components under the key VERIFIER: accuracy, in training and in evaluation,
    is always the verifier's, scored under the pool's timeout like every reward."""
    if any(c.key == VERIFIER for c in reward.components):
        return reward
    return reward.model_copy(update={"components": [*reward.components,
                                                    ComponentConfig(name="task", weight=0.0)]})


def overhead_metrics(metrics: dict[str, float], compute: dict[str, float]) -> dict[str, float]:
    """The workers' compute seconds in an RL step, and the framework overhead: what
    the step's wall time spent beyond that compute, the reward phase and the weight
    sync (none when dynamic sampling dropped every group)."""
    out = {f"time/compute/{name}": compute.get(name, 0.0) for name in ("generate", "logprob", "update")}
    step = metrics["time/step"]
    overhead = step - sum(out.values()) - metrics["time/reward"] - metrics.get("time/weight_sync", 0.0)
    out.update({"time/framework_overhead": overhead, "time/framework_overhead_frac": overhead / step})
    return out


def init_ray(rc: RayConfig, workers: int) -> None:
    """Join the cluster at `rc.address`, or start a local one with a CPU per worker (at
    least as many as the machine has)."""
    import ray

    if ray.is_initialized():
        return
    if rc.address:
        ray.init(address=rc.address)
        return
    ray.init(num_cpus=rc.num_cpus or max(workers, os.cpu_count() or 1),
             include_dashboard=False, log_to_driver=True)


# ----- checkpoints (shared with rlpost/offline_trainer.py) ---------------------------------
def write_trainer_state(tag_dir: Path, state: dict) -> None:
    """The controller's part of a checkpoint the learners just saved in `tag_dir`: `state`
    plus the RNG states."""
    state = {**state, "python_rng": random.getstate(), "torch_rng": torch.get_rng_state().tolist()}
    # written whole or not at all: a run killed mid-write must still find its last checkpoint
    write_json(tag_dir / "trainer_state.json", state)


def latest_checkpoint(run_dir: Path) -> tuple[str, dict] | None:
    """Tag and trainer state of the run's last complete checkpoint, if any."""
    ckpt_dir = run_dir / "checkpoints"
    tags = [t for t in checkpoint_tags(ckpt_dir) if (ckpt_dir / t / "trainer_state.json").is_file()]
    if not tags:
        return None
    return tags[-1], json.loads((ckpt_dir / tags[-1] / "trainer_state.json").read_text())


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python_rng"]  # JSON turned the tuples into lists
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))


def prepare_run_dir(cfg: TrainConfig) -> Path:
    if cfg.resume:
        run_dir = Path(cfg.resume)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{suffix}"
        run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def train(cfg: TrainConfig) -> Result:
    run_dir = prepare_run_dir(cfg)
    trainer = Trainer(cfg, run_dir)
    try:
        return trainer.run()
    finally:
        trainer.shutdown()
