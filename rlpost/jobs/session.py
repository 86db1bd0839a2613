"""What every job on prompts shares: problems, model, Ray, reward pool, warm-up and worker groups.

Shared by `rlpost train`, `rlpost eval` and `rlpost cdpo`: the training prompts and the eval
sets, the initial model and its tokenizer, Ray, the placement, the reward pool, the
supervised warm-up, the worker groups, and generation, scoring and evaluation through them.

Prompts come from the task's generator or from files (`data.train_files`, read by
rlpost/data/prompt_files.py once the tokenizer is up, before Ray starts). A task's eval set
is a separately seeded draw without the training problems, so evaluation never scores a
problem the policy trained on; the eval sets of files are `data.eval_files`. A sample is
correct when its route's verifier scores it 1 (rewards/config.py): for a task, always the
task's own verifier (`with_verifier`), whatever the reward is made of.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.base import SamplingRule
from rlpost.config.sections import RayConfig
from rlpost.data.batch import Sample
from rlpost.data.prompt_files import PromptDataset, resolve_files
from rlpost.data.prompts import encode_prompt
from rlpost.data.rows import PreferenceDataError
from rlpost.data.stream import derive_seed
from rlpost.errors import ConfigError
from rlpost.jobs.evaluate import EvalSet, Evaluator
from rlpost.jobs.preflight import eval_set_files
from rlpost.jobs.update import Split, learner_split, train_minibatches
from rlpost.jobs.warmup_reuse import share, take_shared
from rlpost.jobs.weights import WeightSync
from rlpost.model.load import load_tokenizer, materialise_initial_model
from rlpost.rewards import Problem, build_task
from rlpost.rewards.config import ComponentConfig, RewardConfig
from rlpost.rewards.scoring.pool import RESERVED_SOURCES, RewardPool, RewardResult
from rlpost.rewards.tasks.file_rows import FileRows
from rlpost.tracking.tracker import Tracker
from rlpost.workers.group import Placement, WorkerGroup, gather, model_roles
from rlpost.workers.learner import LRSchedule, start_learner_group
from rlpost.workers.rollout import RolloutWorker
from rlpost.workers.threads import set_threads

VERIFIER = "task"  # key of the task's own score among the reward components
PROMPT_MEMO = 4096  # prompts whose token ids are kept (a step's, with room)


class Session:
    """Constructed from the config alone (a task too small for a held-out set is a
    ConfigError here); `prepare` starts what the job runs on; `shutdown` stops it all."""

    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.use_ray = cfg.mode == "ray"
        self.train_problems: Sequence[Problem] | None = None  # files: read once the tokenizer is up
        self.eval_sets: list[EvalSet] = []
        if cfg.from_files:
            self.task = FileRows()
        else:
            self.task = build_task(cfg.task.name, cfg.task.args)
            self.train_problems = self.task.problems(cfg.task.train_size, seed=cfg.seed)
            seen = {p.prompt for p in self.train_problems}
            held_out = self.task.problems(cfg.task.eval_size * 4, seed=derive_seed(cfg.seed, "eval"))
            eval_problems = [p for p in held_out if p.prompt not in seen][: cfg.task.eval_size]
            if not eval_problems:
                raise ConfigError(
                    f"key 'task.train_size': the {len(seen)} distinct training problems "
                    f"include every problem the task generated for evaluation; lower "
                    f"task.train_size or make the task larger (task.args)"
                )
            for p in (*self.train_problems, *eval_problems):
                p.source = cfg.task.name
            self.eval_sets = [EvalSet(cfg.task.name, eval_problems)]
        self._prompt_ids: OrderedDict[str, list[int]] = OrderedDict()
        self._encode_lock = threading.Lock()
        self.tokenizer = None
        self.tracker: Tracker | None = None
        self.placement: Placement | None = None
        self.rewards: RewardPool | None = None
        self.started = False  # sticky (shutdown clears `rewards`): a later refusal marks FAILED
        self.rollout: WorkerGroup | None = None
        self.learners: WorkerGroup | None = None  # the job's own (the warm-up's are its own)
        self.split: Split | None = None  # how the learners cut a batch: known once they are up
        self.weights: WeightSync | None = None  # the RL job's syncs into the rollout workers

    # ----- start and stop ---------------------------------------------------------------
    def prepare(self, tracker: Tracker, warmup_dir: Path | None, training: bool = True) -> Path:
        """Everything before the first learner of the job: the initial model and its
        tokenizer, the prompt files (the training files only when `training`), Ray, the
        placement, the reward pool, and the warm-up (skipped when `warmup_dir` holds a
        finished one, or is None). `tracker` takes the session's lines (the job that made
        it closes it). Returns the starting policy's directory."""
        cfg = self.cfg
        set_threads()
        initial = materialise_initial_model(
            cfg.model, self.task.alphabet, cfg.seed, self.run_dir / "models" / "initial"
        )
        self.tokenizer = load_tokenizer(initial)
        self.tracker = tracker
        if cfg.from_files:  # bad rows are reported (or, strict, an error) before Ray starts
            self.read_prompt_files(training)
        if self.use_ray:
            split_threads(cfg)
            ranks = cfg.learner.num_learners * (1 + len(model_roles(cfg)))  # critic, PRM
            init_ray(cfg.ray, cfg.rollout.num_workers + ranks)
        # before the warm-up: its learners and the job's learners take the same slots
        self.placement = Placement(cfg, use_ray=self.use_ray)
        reward = cfg.reward if cfg.from_files else with_verifier(cfg.reward)
        self.started = True
        self.rewards = RewardPool(reward, self.task, use_ray=self.use_ray)
        if not cfg.warmup.steps or warmup_dir is None:
            return initial
        if not (warmup_dir / "tokenizer_config.json").is_file():  # written last
            shared = take_shared(cfg, warmup_dir) if cfg.warmup.reuse else None
            if shared is not None:
                tracker.print_line(f"warm-up: reused {shared} (warmup.reuse)")
            else:
                self.warmup(initial, warmup_dir)
                if cfg.warmup.reuse:
                    share(cfg, warmup_dir)
        return warmup_dir

    def read_prompt_files(self, training: bool) -> None:
        """The eval sets of `data` and (`training`) its training prompts, each file's
        skipped rows reported."""
        dc = self.cfg.data

        def load(files: list[Path]) -> PromptDataset:
            ds = PromptDataset.load(files, dc, self.tokenizer, self.cfg.task)
            for report in ds.reports:
                self.tracker.print_line(f"data: {report.summary()}")
            taken = sorted(set(ds.sources) & set(RESERVED_SOURCES))
            if taken:
                raise PreferenceDataError(
                    f"{', '.join(map(str, files))}: source {taken[0]!r} would overwrite the metrics "
                    f"named after it (accuracy/all, reward/failures/*); rename it, or set "
                    f"data.default_source for rows without one"
                )
            return ds

        if training:
            self.train_problems = load(resolve_files(dc.train_files, "data.train_files"))
        self.eval_sets = [EvalSet(name, load([path])) for name, path in eval_set_files(dc.eval_files).items()]

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
    def encode_prompt(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """Token ids of a prompt (memoised for the latest prompts: every RL step encodes
        its prompts for the engines and again for the samples; callers must not modify
        the list). Streaming's feeder thread encodes too: a fast tokenizer is not to be
        used from two threads at once."""
        key = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
        with self._encode_lock:
            ids = self._prompt_ids.get(key)
            if ids is None:
                ids = self._prompt_ids[key] = encode_prompt(self.tokenizer, prompt, self.cfg.task)
                if len(self._prompt_ids) > PROMPT_MEMO:
                    self._prompt_ids.popitem(last=False)
        return ids

    def generate(self, *args, **kwargs) -> list[list]:
        """`submit_generation`'s completions, waited for and checked."""
        return self.collect_generation(self.submit_generation(*args, **kwargs))

    def submit_generation(
        self,
        problems: list[Problem],
        n: int,
        temperature: float,
        seed: int,
        rule: SamplingRule | None = None,
        top_p: float | None = None,
    ) -> list:
        """`n` completions of each problem, the problems split evenly across the rollout
        workers, each seeded by (seed, its rank); `top_p` defaults to rollout's. Returned
        without waiting on Ray: a reference per worker (in-process, its completions), for
        `collect_generation`."""
        prompts = [self.encode_prompt(p.prompt) for p in problems]
        per = -(-len(prompts) // len(self.rollout))
        rc = self.cfg.rollout
        chunks = [
            (prompts[r * per : (r + 1) * per], n, temperature, top_p or rc.top_p)
            + (rc.max_new_tokens, derive_seed(seed, r), rule)
            for r in range(len(self.rollout))
        ]
        if self.use_ray:
            return self.rollout.submit("generate", per_rank=chunks)
        return self.rollout.call("generate", per_rank=chunks)

    def collect_generation(self, parts: list, version: int | None = None) -> list[list]:
        """The completions of a `submit_generation`, in the problems' order, checked to be
        sampled with weight `version` (None: the latest sync's)."""
        refs = [p for p in parts if not isinstance(p, list)]
        results = iter(gather(refs) if refs else ())
        completions = [c for part in parts for c in (part if isinstance(part, list) else next(results))]
        if self.weights is not None:
            self.weights.check_rollouts(completions, version)
        return completions

    def decode(self, responses: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(responses, skip_special_tokens=True)

    def score(self, responses: list[list[int]], problems: list[Problem]) -> RewardResult:
        """Rewards of responses (token ids) through the reward pool; responses of the
        round that raise or time out score 0 and are reported in the result."""
        return self.score_texts(self.decode(responses), [len(r) for r in responses], problems)

    def score_texts(self, texts: list[str], lengths: list[int], problems: list[Problem]) -> RewardResult:
        return self.rewards.score(texts, problems, lengths=lengths)

    def evaluate(self, label: str) -> dict[str, float]:
        """Every eval set, greedy and sampled (rlpost/jobs/evaluate.py); the completions go
        to run_dir/eval/<label>.jsonl."""
        evaluator = Evaluator(self, self.eval_sets, self.cfg.eval, self.cfg.rollout, self.cfg.seed)
        return evaluator.run(self.run_dir / "eval" / f"{label}.jsonl")

    def worker_compute_times(self) -> dict[str, list[dict[str, float]]]:
        """Each worker's compute seconds by kind since the last call, per role."""
        groups = {"rollout": self.rollout, "learner": self.learners}
        return {role: group.call("take_compute_times") for role, group in groups.items() if group is not None}


def with_verifier(reward: RewardConfig) -> RewardConfig:
    """The configured reward, plus the task's own verifier at weight 0 when it is not one
    of the components under the key VERIFIER: accuracy, in training and in evaluation,
    is always the verifier's, scored under the pool's timeout like every reward."""
    if any(c.key == VERIFIER for c in reward.components):
        return reward
    return reward.model_copy(
        update={"components": [*reward.components, ComponentConfig(name="task", weight=0.0)]}
    )


def split_threads(cfg) -> None:
    """With rollout.staleness, generation and the update overlap: unless set, the rollout
    workers and the learners each get half the machine's cores for torch (Ray's local
    workers inherit this environment). Every core for every worker ran one-step-off 4x
    slower than a split on a 2-core machine (docs/performance.md section 7)."""
    if getattr(getattr(cfg, "rollout", None), "staleness", 0) and "RLPOST_THREADS" not in os.environ:
        half = str(max(1, (os.cpu_count() or 2) // 2))
        for role in ("ROLLOUT", "LEARNER"):
            os.environ.setdefault(f"RLPOST_THREADS_{role}", half)


def init_ray(rc: RayConfig, workers: int) -> None:
    """Join the cluster at `rc.address`, or start a local one with a CPU per worker (at
    least as many as the machine has); then check it offers the custom resources of `rc`."""
    import ray

    if not ray.is_initialized():
        if rc.address:
            ray.init(address=rc.address)
        else:
            ray.init(
                num_cpus=rc.num_cpus or max(workers, os.cpu_count() or 1),
                include_dashboard=False,
                log_to_driver=True,
            )
    offered = ray.cluster_resources()
    for key in ("learner_resources", "rollout_resources"):  # offline jobs have no rollout's
        for name in getattr(rc, key, {}):
            if name not in offered:
                # else the placement group would wait for such a node forever, without a word
                raise ConfigError(
                    f"key 'ray.{key}': no node of the Ray cluster offers the resource {name!r} "
                    f"(start the nodes meant for it with ray start --resources='{{\"{name}\": N}}')"
                )
