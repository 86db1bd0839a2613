"""What every job on a task shares: problems, model, Ray, reward pool, warm-up and worker groups.

Shared by `rlpost train` and `rlpost cdpo`: the task's training and held-out problems, the
initial model and its tokenizer, Ray, the placement, the reward pool, the supervised warm-
up, the worker groups, and generation, scoring and evaluation through them.

The held-out problems are those of a separately seeded draw that are not training
problems, so evaluation never scores a problem the policy trained on. Accuracy is
always the task's own verifier (`with_verifier`), whatever the reward is made of.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.base import SamplingRule
from rlpost.config.sections import RayConfig
from rlpost.data.batch import Sample
from rlpost.data.prompts import encode_prompt
from rlpost.data.stream import derive_seed
from rlpost.errors import ConfigError
from rlpost.jobs.update import Split, learner_split, train_minibatches
from rlpost.model.load import load_tokenizer, materialise_initial_model
from rlpost.rewards import Problem, build_task
from rlpost.rewards.config import ComponentConfig, RewardConfig
from rlpost.rewards.scoring.pool import RewardPool, RewardResult
from rlpost.tracking.tracker import Tracker
from rlpost.workers.group import Placement, WorkerGroup
from rlpost.workers.learner import LRSchedule, start_learner_group
from rlpost.workers.rollout import RolloutWorker
from rlpost.workers.threads import set_threads

VERIFIER = "task"  # key of the task's own score among the reward components


class Session:
    """Constructed from the config alone (a task too small for a held-out set is a
    ConfigError here); `prepare` starts what the job runs on; `shutdown` stops it all."""

    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.use_ray = cfg.mode == "ray"
        self.task = build_task(cfg.task.name, cfg.task.args)
        self.train_problems = self.task.problems(cfg.task.train_size, seed=cfg.seed)
        seen = {p.prompt for p in self.train_problems}
        held_out = self.task.problems(cfg.task.eval_size * 4, seed=derive_seed(cfg.seed, "eval"))
        self.eval_problems = [p for p in held_out if p.prompt not in seen][: cfg.task.eval_size]
        if not self.eval_problems:
            raise ConfigError(
                f"key 'task.train_size': the {len(seen)} distinct training problems "
                f"include every problem the task generated for evaluation; lower "
                f"task.train_size or make the task larger (task.args)"
            )
        self._prompt_ids: dict[str, list[int]] = {}
        self.tokenizer = None
        self.tracker: Tracker | None = None
        self.placement: Placement | None = None
        self.rewards: RewardPool | None = None
        self.rollout: WorkerGroup | None = None
        self.learners: WorkerGroup | None = None  # the job's own (the warm-up's are its own)
        self.split: Split | None = None  # how the learners cut a batch: known once they are up

    # ----- start and stop ---------------------------------------------------------------
    def prepare(self, tracker: Tracker, warmup_dir: Path) -> Path:
        """Everything before the first learner of the job: the initial model and its
        tokenizer, Ray, the placement, the reward pool, and the warm-up (skipped when
        `warmup_dir` holds a finished one). `tracker` takes the session's lines (the job
        that made it closes it). Returns the starting policy's directory."""
        cfg = self.cfg
        set_threads()
        initial = materialise_initial_model(
            cfg.model, self.task.alphabet, cfg.seed, self.run_dir / "models" / "initial"
        )
        self.tokenizer = load_tokenizer(initial)
        self.tracker = tracker
        if self.use_ray:
            init_ray(cfg.ray, cfg.rollout.num_workers + cfg.learner.num_learners)
        # before the warm-up: its learners and the job's learners take the same slots
        self.placement = Placement(cfg, use_ray=self.use_ray)
        self.rewards = RewardPool(with_verifier(cfg.reward), self.task, use_ray=self.use_ray)
        if not cfg.warmup.steps:
            return initial
        if not (warmup_dir / "tokenizer_config.json").is_file():  # written last
            self.warmup(initial, warmup_dir)
        return warmup_dir

    def start_learners(
        self, model_dir: Path, algorithm: tuple[str, dict], schedule: LRSchedule
    ) -> WorkerGroup:
        group = start_learner_group(
            self.cfg,
            model_dir,
            algorithm,
            schedule,
            pad_id=self.tokenizer.pad_token_id,
            use_ray=self.use_ray,
            slots=self.placement.slots("learner"),
        )
        self.split = learner_split(self.cfg.learner, packed=group.call("is_packed")[0])
        return group

    def start_rollout(self, model_dir: Path) -> WorkerGroup:
        cfg = self.cfg
        self.rollout = WorkerGroup(
            RolloutWorker,
            cfg.rollout.num_workers,
            lambda rank: dict(
                model_dir=str(model_dir), cfg=cfg.rollout, dtype=cfg.model.dtype, seed=cfg.seed, rank=rank
            ),
            use_ray=self.use_ray,
            slots=self.placement.slots("rollout"),
        )
        return self.rollout

    def stop_rollout(self) -> None:
        """Frees the rollout workers' slots (a later stage's learners may take them)."""
        self.rollout.shutdown()
        self.rollout = None

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

    def warmup(self, model_dir: Path, out_dir: Path) -> None:
        """Supervised warm-up on the task's demonstrations; writes a HF model to out_dir."""
        wc = self.cfg.warmup
        sft = build_algorithm("sft", {})
        learners = self.start_learners(
            model_dir,
            ("sft", {}),
            LRSchedule(wc.lr, wc.lr_warmup_steps, wc.lr_schedule, total_steps=wc.steps),
        )
        rng = random.Random(derive_seed(self.cfg.seed, "warmup"))
        eos = self.tokenizer.eos_token_id
        t0 = time.time()
        for step in range(1, wc.steps + 1):
            batch = [
                Sample(
                    prompt_ids=self.encode_prompt(p.prompt),
                    response_ids=self.tokenizer.encode(
                        self.task.demonstration(p, rng), add_special_tokens=False
                    )
                    + [eos],
                )
                for p in rng.sample(self.train_problems, wc.batch_size)
            ]
            (merged,) = train_minibatches(learners, sft, [batch], self.split)
            if step % max(1, wc.steps // 10) == 0 or step == wc.steps:
                nll = merged.result()["loss"]
                self.tracker.print_line(
                    f"warm-up {step}/{wc.steps} | nll {nll:.3f} | {time.time() - t0:.0f}s"
                )
        learners.call("save_pretrained", str(out_dir))
        learners.shutdown()
        self.tokenizer.save_pretrained(out_dir)

    # ----- through the workers ---------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt (memoised: every RL step encodes its prompts for the
        engines and again for the samples; callers must not modify the list)."""
        ids = self._prompt_ids.get(text)
        if ids is None:
            ids = self._prompt_ids[text] = encode_prompt(self.tokenizer, text, self.cfg.task)
        return ids

    def generate(
        self, problems: list[Problem], n: int, temperature: float, seed: int, rule: SamplingRule | None = None
    ) -> list[list]:
        """`n` completions of each problem, the problems split evenly across the rollout
        workers, each worker seeded by (seed, its rank)."""
        prompts = [self.encode_prompt(p.prompt) for p in problems]
        workers = len(self.rollout)
        per = -(-len(prompts) // workers)
        chunks = [
            (
                prompts[r * per : (r + 1) * per],
                n,
                temperature,
                self.cfg.rollout.top_p,
                self.cfg.rollout.max_new_tokens,
                derive_seed(seed, r),
                rule,
            )
            for r in range(workers)
        ]
        return [c for part in self.rollout.call("generate", per_rank=chunks) for c in part]

    def score(self, responses: list[list[int]], problems: list[Problem]) -> RewardResult:
        """Rewards of responses (token ids) through the reward pool; responses of the
        round that raise or time out score 0 and are reported in the result."""
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return self.rewards.score(texts, problems, lengths=[len(r) for r in responses])

    def evaluate(self) -> dict[str, float]:
        """Greedy and sampled accuracy (the verifier's) on the held-out problems."""
        problems = self.eval_problems
        seed = derive_seed(self.cfg.seed, "eval-sample")
        greedy = self.generate(problems, 1, 0.0, seed)
        sampled = self.generate(problems, 1, self.cfg.rollout.temperature, seed)
        self.compute_times()  # evaluation's generation counts in no RL step

        def acc(groups):
            correct = self.score([g[0].ids for g in groups], problems).components[VERIFIER]
            return sum(correct) / len(problems)

        return {"eval/accuracy_greedy": acc(greedy), "eval/accuracy_sampled": acc(sampled)}

    def compute_times(self) -> dict[str, float]:
        """Seconds of generation, log-prob forward and update compute since the last
        call, each from the slowest worker: a group's workers run in parallel."""
        out: dict[str, float] = {}
        for group in (self.rollout, self.learners):
            for seconds in group.call("take_compute_times") if group is not None else ():
                for name, value in seconds.items():
                    out[name] = max(out.get(name, 0.0), value)
        return out


def with_verifier(reward: RewardConfig) -> RewardConfig:
    """The configured reward, plus the task's own verifier at weight 0 when it is not one
    of the components under the key VERIFIER: accuracy, in training and in evaluation,
    is always the verifier's, scored under the pool's timeout like every reward."""
    if any(c.key == VERIFIER for c in reward.components):
        return reward
    return reward.model_copy(
        update={"components": [*reward.components, ComponentConfig(name="task", weight=0.0)]}
    )


def init_ray(rc: RayConfig, workers: int) -> None:
    """Join the cluster at `rc.address`, or start a local one with a CPU per worker (at
    least as many as the machine has)."""
    import ray

    if ray.is_initialized():
        return
    if rc.address:
        ray.init(address=rc.address)
        return
    ray.init(
        num_cpus=rc.num_cpus or max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True
    )
