"""The controller: warm-up, then the RL loop, readable top to bottom.

    prompts -> rollout workers -> rewards -> advantages (algorithm)
      -> learners: old / reference log-probs, mini-batch updates
      -> weights pushed to the rollout workers -> metrics

Every random choice is seeded from (seed, step), so a resumed run repeats the
steps an uninterrupted one would have taken, and the in-process and Ray modes
take the same ones.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlpost.algorithms import build_algorithm
from rlpost.batch import Sample, shard, view
from rlpost.config import TrainConfig, dump_config
from rlpost.metrics import MetricSums
from rlpost.models import load_tokenizer, materialise_initial_model
from rlpost.rewards import Problem, build_task
from rlpost.tracking import Tracker
from rlpost.workers.group import WorkerGroup
from rlpost.workers.learner import LRSchedule, checkpoint_tags, set_threads, start_learner_group
from rlpost.workers.rollout import RolloutWorker


def derive_seed(*parts) -> int:
    return random.Random(":".join(map(str, parts))).randrange(2**31)


@dataclass
class Result:
    run_dir: Path
    accuracy_before: float
    accuracy_after: float


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.use_ray = cfg.mode == "ray"
        self.task = build_task(cfg.task.name, cfg.task.args)
        self.train_problems = self.task.problems(cfg.task.train_size, seed=cfg.seed)
        seen = {p.prompt for p in self.train_problems}
        held_out = self.task.problems(cfg.task.eval_size * 4, seed=derive_seed(cfg.seed, "eval"))
        self.eval_problems = [p for p in held_out if p.prompt not in seen][:cfg.task.eval_size]
        self.algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.params())
        self.tracker: Tracker | None = None
        self._orders: dict[int, list[int]] = {}
        self.rollout: WorkerGroup | None = None
        self.learners: WorkerGroup | None = None

    # ----- prompts and rewards -------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + ids

    def decode_response(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.train_problems)))
            random.Random(derive_seed(self.cfg.seed, "epoch", epoch)).shuffle(order)
            self._orders = {epoch: order}  # steps only move forward: keep one epoch
        return self._orders[epoch]

    def prompts_for_step(self, step: int) -> list[Problem]:
        """Step s (1-based) takes the next prompts_per_step problems of a seeded epoch order."""
        per = self.cfg.rollout.prompts_per_step
        positions = (divmod(pos, len(self.train_problems)) for pos in range((step - 1) * per, step * per))
        return [self.train_problems[self.epoch_order(epoch)[idx]] for epoch, idx in positions]

    def generate(self, problems: list[Problem], n: int, temperature: float, seed: int
                 ) -> list[list]:
        prompts = [self.encode_prompt(p.prompt) for p in problems]
        workers = len(self.rollout)
        per = -(-len(prompts) // workers)
        chunks = [(prompts[r * per:(r + 1) * per], n, temperature, self.cfg.rollout.top_p,
                   self.cfg.rollout.max_new_tokens, derive_seed(seed, r)) for r in range(workers)]
        return [c for part in self.rollout.call("generate", per_rank=chunks) for c in part]

    # ----- stages --------------------------------------------------------------
    def start_learners(self, model_dir: Path, algorithm: tuple[str, dict],
                       schedule: LRSchedule) -> WorkerGroup:
        return start_learner_group(self.cfg, model_dir, algorithm, schedule,
                                   pad_id=self.tokenizer.pad_token_id, use_ray=self.use_ray)

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
            merged = self.train_minibatch(learners, sft, batch)
            if step % max(1, wc.steps // 10) == 0 or step == wc.steps:
                nll = merged.result()["loss"]
                self.tracker.print_line(f"warm-up {step}/{wc.steps} | nll {nll:.3f} | "
                                        f"{time.time() - t0:.0f}s")
        learners.call("save_pretrained", str(out_dir))
        learners.shutdown()
        self.tokenizer.save_pretrained(out_dir)

    def train_minibatch(self, learners: WorkerGroup, algorithm, samples: list[Sample]) -> MetricSums:
        """One optimizer step: aggregation weights over the whole mini-batch, then
        split across learner ranks and micro-batches."""
        batch = view(samples)
        weights = algorithm.token_weights(batch)
        for s, w in zip(samples, weights.split([s.num_tokens for s in samples])):
            s.weights = w
        parts = shard(samples, self.cfg.learner.num_learners, self.cfg.learner.micro_batch_size)
        merged = MetricSums()
        for m in learners.call("train_minibatch", per_rank=[(p,) for p in parts]):
            merged.merge(m)
        for name, value in algorithm.weight_metrics(batch, weights).items():
            merged.add_mean(name, value)
        return merged

    def evaluate(self) -> dict[str, float]:
        problems = self.eval_problems
        seed = derive_seed(self.cfg.seed, "eval-sample")
        greedy = self.generate(problems, 1, 0.0, seed)
        sampled = self.generate(problems, 1, self.cfg.rollout.temperature, seed)

        def acc(groups):
            return sum(self.task.score(self.decode_response(g[0].ids), p)
                       for g, p in zip(groups, problems)) / len(problems)

        return {"eval/accuracy_greedy": acc(greedy), "eval/accuracy_sampled": acc(sampled)}

    # ----- the RL step ---------------------------------------------------------
    def rl_step(self, step: int) -> dict[str, float]:
        cfg, lc = self.cfg, self.cfg.learner
        times: dict[str, float] = {}
        t = time.perf_counter()
        problems = self.prompts_for_step(step)
        groups = self.generate(problems, cfg.rollout.n, cfg.rollout.temperature,
                               derive_seed(cfg.seed, "rollout", step))
        times["rollout"] = time.perf_counter() - t

        t = time.perf_counter()
        samples: list[Sample] = []
        prompt_ids = [self.encode_prompt(p.prompt) for p in problems]
        for g, (problem, completions) in enumerate(zip(problems, groups)):
            for c in completions:
                reward = self.task.score(self.decode_response(c.ids), problem)
                samples.append(Sample(prompt_ids=prompt_ids[g], response_ids=c.ids, group=g,
                                      reward=reward, truncated=c.truncated,
                                      rollout_logp=c.logprobs))
        shape = (len(problems), cfg.rollout.n)
        rewards = torch.tensor([s.reward for s in samples]).view(shape)
        lengths = torch.tensor([s.num_tokens for s in samples]).view(shape)
        advantages = self.algorithm.advantages(rewards, lengths).flatten()
        for s, a in zip(samples, advantages.tolist()):
            s.advantages = torch.full((s.num_tokens,), a)
        times["reward"] = time.perf_counter() - t

        t = time.perf_counter()
        parts = shard(samples, lc.num_learners, lc.micro_batch_size)
        results = [r for part in self.learners.call(
            "logprobs", per_rank=[(p, self.algorithm.needs.reference) for p in parts]) for r in part]
        for s, r in zip(samples, results):
            s.old_logp, s.ref_logp = r["logp"], r["ref_logp"]
        entropy = torch.cat([r["entropy"] for r in results])
        for name, values in self.algorithm.token_inputs(entropy).items():
            for s, v in zip(samples, values.split([s.num_tokens for s in samples])):
                s.extra[name] = v
        times["logprob"] = time.perf_counter() - t

        t = time.perf_counter()
        update = MetricSums()
        for epoch in range(lc.epochs):
            order = list(range(len(problems)))
            random.Random(derive_seed(cfg.seed, "shuffle", step, epoch)).shuffle(order)
            # whole groups stay together; mini-batches are cut from the shuffled groups
            shuffled = [s for g in order for s in samples[g * cfg.rollout.n:(g + 1) * cfg.rollout.n]]
            for start in range(0, len(shuffled), lc.mini_batch_size):
                mini = shuffled[start:start + lc.mini_batch_size]
                merged = self.train_minibatch(self.learners, self.algorithm, mini)
                for k, v in merged.result().items():
                    update.add_mean(k, v)
        times["update"] = time.perf_counter() - t

        t = time.perf_counter()
        self.sync_weights()
        times["weight_sync"] = time.perf_counter() - t
        return self.step_metrics(samples, entropy, update, times)

    def sync_weights(self) -> None:
        weights = self.learners.call("export_weights")[0]
        if self.use_ray:
            import ray

            weights = ray.put(weights)
        self.rollout.call("update_weights", weights)

    def step_metrics(self, samples, entropy, update: MetricSums, times) -> dict[str, float]:
        rewards = torch.tensor([s.reward for s in samples])
        lengths = torch.tensor([s.num_tokens for s in samples], dtype=torch.float)
        gap = torch.cat([(torch.tensor(s.rollout_logp) - s.old_logp).abs() for s in samples])
        n_tokens = int(lengths.sum())
        step_time = sum(times.values())
        out = {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(samples) > 1 else 0.0,
            f"accuracy/{self.cfg.task.name}": (rewards == 1).float().mean().item(),
            "response_length/mean": lengths.mean().item(),
            "response_length/max": lengths.max().item(),
            "response_length/clipped_frac": sum(s.truncated for s in samples) / len(samples),
            "rollout_entropy": entropy.mean().item(),
            "logprob_gap/rollout_vs_learner_mean": gap.mean().item(),
            "logprob_gap/rollout_vs_learner_max": gap.max().item(),
            "tokens": n_tokens,
            "tokens_per_sec": n_tokens / step_time,
            "time/step": step_time,
        }
        out.update({f"time/{k}": v for k, v in times.items()})
        out.update(update.result())
        return out

    # ----- checkpoints -----------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        ckpt_dir = self.run_dir / "checkpoints"
        tag = f"step_{step}"
        self.learners.call("save_checkpoint", str(ckpt_dir), tag)
        state = {"step": step,
                 "data_position": step * self.cfg.rollout.prompts_per_step,
                 "python_rng": random.getstate(),
                 "torch_rng": torch.get_rng_state().tolist()}
        (ckpt_dir / tag / "trainer_state.json").write_text(json.dumps(state))
        self.tracker.plot()

    def latest_checkpoint(self) -> tuple[str, dict] | None:
        ckpt_dir = self.run_dir / "checkpoints"
        tags = [t for t in checkpoint_tags(ckpt_dir) if (ckpt_dir / t / "trainer_state.json").is_file()]
        if not tags:
            return None
        return tags[-1], json.loads((ckpt_dir / tags[-1] / "trainer_state.json").read_text())

    def load_checkpoint(self, tag: str, state: dict) -> None:
        self.learners.call("load_checkpoint", str(self.run_dir / "checkpoints"), tag)
        version, internal, gauss = state["python_rng"]  # JSON turned the tuples into lists
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        self.sync_weights()

    # ----- the whole job -----------------------------------------------------------
    def run(self) -> Result:
        cfg, run_dir = self.cfg, self.run_dir
        set_threads()
        models = run_dir / "models"
        initial = materialise_initial_model(cfg.model, self.task.alphabet, cfg.seed, models / "initial")
        self.tokenizer = load_tokenizer(initial)
        checkpoint = self.latest_checkpoint() if cfg.resume else None
        self.tracker = Tracker(run_dir, cfg, resume_step=checkpoint[1]["step"] if checkpoint else None)
        if self.use_ray:
            self.start_ray()
        start_model = initial
        if cfg.warmup.steps:
            start_model = models / "warmup"
            if not (start_model / "tokenizer_config.json").is_file():  # written last
                self.warmup(initial, start_model)
        lc = cfg.learner
        optimizer_steps = cfg.steps * lc.epochs * (cfg.rollout.prompts_per_step * cfg.rollout.n
                                                   // lc.mini_batch_size)
        self.learners = self.start_learners(
            start_model, (cfg.algorithm.name, cfg.algorithm.params()),
            LRSchedule(lc.lr, lc.lr_warmup_steps, lc.lr_schedule, total_steps=optimizer_steps))
        self.rollout = WorkerGroup(
            RolloutWorker, cfg.rollout.num_workers,
            lambda rank: dict(model_dir=str(start_model), cfg=cfg.rollout, dtype=cfg.model.dtype,
                              seed=cfg.seed, rank=rank),
            use_ray=self.use_ray, num_cpus=1, num_gpus=cfg.ray.gpus_per_rollout_worker)
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
        import os

        import ray

        if ray.is_initialized():
            return
        if self.cfg.ray.address:
            ray.init(address=self.cfg.ray.address)
            return
        needed = self.cfg.rollout.num_workers + self.cfg.learner.num_learners
        ray.init(num_cpus=self.cfg.ray.num_cpus or max(needed, os.cpu_count() or 1),
                 include_dashboard=False, log_to_driver=True)

    def shutdown(self) -> None:
        for group in (self.rollout, self.learners):
            if group is not None:
                group.shutdown()
        self.rollout = self.learners = None
        if self.tracker is not None:
            self.tracker.close()


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
