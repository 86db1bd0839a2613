"""The config of `rlpost train CONFIG`: the RL job."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.base import AlgoConfig, PolicyGradient
from rlpost.config.asynchrony import OffPolicyConfig
from rlpost.config.base import BestMode, keep_best_field, keep_last_field, retention_problem
from rlpost.config.colocation import check_colocation
from rlpost.config.credit import CriticConfig, PRMConfig, StepsConfig
from rlpost.config.data import DataConfig, EvalConfig
from rlpost.config.placement import placement_problem
from rlpost.config.reweighting import ReweightingConfig
from rlpost.config.sections import (
    LearnerConfig,
    ModelConfig,
    RayConfig,
    RolloutConfig,
    Section,
    TaskConfig,
    TrackingConfig,
    WarmupConfig,
    algorithm_section,
)
from rlpost.rewards.config import RewardConfig

# The default reward of prompts read from files: math-verify on the row's answer.
FILE_DATA_REWARD = "math"


class TrainConfig(Section):
    name: str = "run"
    seed: int = 0
    mode: Literal["ray", "inprocess"] = "ray"
    steps: int = Field(50, ge=0)
    eval_every: int = Field(0, ge=0, description="0: evaluate only before and after RL")
    save_every: int = Field(0, ge=0, description="0: only a final checkpoint")
    save_keep_last: int | None = keep_last_field()
    save_keep_best: str | None = keep_best_field()
    save_keep_best_mode: BestMode | None = Field(None, description="best is the max (None) or the min")
    output_dir: str = "runs"
    resume: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    off_policy: OffPolicyConfig = Field(default_factory=OffPolicyConfig)
    # the policy's updates only: not the warm-up, the critic or the PRM
    reweighting: ReweightingConfig = Field(default_factory=ReweightingConfig)
    # the chosen algorithm's Config with its `name` (`algorithm_section`); serialised as
    # that class, so config.yaml holds every default
    algorithm: SerializeAsAny[AlgoConfig] = Field(
        default_factory=lambda: algorithm_section({}, PolicyGradient)
    )
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    prm: PRMConfig = Field(default_factory=PRMConfig)
    step_credit: StepsConfig = Field(default_factory=StepsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("algorithm", mode="before")
    @classmethod
    def _typed_algorithm(cls, value):
        return algorithm_section(value, PolicyGradient)

    @property
    def from_files(self) -> bool:
        """Whether the training prompts are read from `data.train_files` (else the task's)."""
        return self.data.train_files is not None

    @model_validator(mode="before")
    @classmethod
    def _file_data_reward(cls, tree):
        """Prompts from files have no task verifier: their default reward is math-verify."""
        data = tree.get("data") if isinstance(tree, dict) else None
        files = data.get("train_files") if isinstance(data, dict) else getattr(data, "train_files", None)
        if files is not None:
            reward = tree.get("reward")
            if reward is None or (isinstance(reward, dict) and "components" not in reward):
                tree = {**tree, "reward": {**(reward or {}), "components": [{"name": FILE_DATA_REWARD}]}}
        return tree

    @model_validator(mode="after")
    def _check_data(self) -> TrainConfig:
        if not self.from_files:
            if self.data.eval_files is not None:
                raise ValueError(
                    "data.eval_files needs data.train_files (the task's prompts are evaluated "
                    "on its own held-out draw)"
                )
            return self
        # a saved config.yaml holds every default: only a key that differs is a second choice
        for key in ("name", "args", "train_size", "eval_size"):
            if getattr(self.task, key) != TaskConfig.model_fields[key].get_default(call_default_factory=True):
                raise ValueError(
                    f"task.{key} and data.train_files both say where prompts come from; keep one "
                    f"(task.chat_template and task.system_prompt apply to files too)"
                )
        if any(c.name == "task" for c in self.reward.all_components()):
            raise ValueError(
                "reward: rows read from files have no task verifier (a 'task' component); "
                "name a reward component such as math, code or function"
            )
        if self.warmup.steps:
            raise ValueError("warmup.steps: the supervised warm-up needs a task's demonstrations, not files")
        rc = self.rollout
        limit = self.data.max_prompt_length
        if rc.engine == "vllm" and limit is not None and limit + rc.max_new_tokens > rc.vllm.max_model_len:
            raise ValueError(
                f"data.max_prompt_length ({limit}) + rollout.max_new_tokens ({rc.max_new_tokens}) "
                f"must fit rollout.vllm.max_model_len ({rc.vllm.max_model_len})"
            )
        return self

    @model_validator(mode="after")
    def _check_retention(self) -> TrainConfig:
        problem = retention_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _check_batch_shape(self) -> TrainConfig:
        rollout_seqs = self.rollout.prompts_per_step * self.rollout.n
        lc = self.learner
        if rollout_seqs % lc.mini_batch_size:
            raise ValueError(
                f"learner.mini_batch_size ({lc.mini_batch_size}) must divide the rollout batch "
                f"(rollout.prompts_per_step * rollout.n = {rollout_seqs})"
            )
        return self

    @model_validator(mode="after")
    def _check_workers(self) -> TrainConfig:
        lc = self.learner
        if self.mode == "inprocess" and lc.num_learners > 1:
            raise ValueError("mode 'inprocess' runs one learner; set learner.num_learners=1 or mode=ray")
        if self.rollout.overlong_buffer and any(c.name == "overlong" for c in self.reward.all_components()):
            raise ValueError(
                "rollout.overlong_buffer and a reward component 'overlong' both shape "
                "overlong responses; keep one"
            )
        if self.rollout.prompts_per_step % self.rollout.num_workers:
            raise ValueError(
                f"rollout.num_workers ({self.rollout.num_workers}) must divide "
                f"rollout.prompts_per_step ({self.rollout.prompts_per_step})"
            )
        return self

    @model_validator(mode="after")
    def _check_placement(self) -> TrainConfig:
        problem = placement_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _check_staleness(self) -> TrainConfig:
        rc = self.rollout
        if rc.staleness and (rc.vllm.sleep_level or self.learner.offload_optimizer):
            key = "rollout.vllm.sleep_level" if rc.vllm.sleep_level else "learner.offload_optimizer"
            raise ValueError(
                f"rollout.staleness {rc.staleness} lets the engines generate during the update, "
                f"but {key} makes the engines and learners take turns with the memory; keep one"
            )
        if rc.async_mode == "streaming" and not rc.staleness:
            raise ValueError("rollout.async_mode 'streaming' needs rollout.staleness >= 1")
        most = (rc.staleness + 1) * rc.prompts_per_step
        if rc.stream.chunk_prompts is not None and rc.stream.chunk_prompts > most:
            raise ValueError(
                f"rollout.stream.chunk_prompts ({rc.stream.chunk_prompts}) must be at most "
                f"(rollout.staleness + 1) * rollout.prompts_per_step ({most}): a chunk is what the "
                f"engines may run ahead of the learners"
            )
        return self

    @model_validator(mode="after")
    def _check_credit_sections(self) -> TrainConfig:
        """A setting of a section the algorithm does not use would be silently ignored."""
        needs = self.needs
        used = {
            "critic": needs.values,
            "prm": needs.implicit_prm,
            "step_credit": needs.step_rewards or needs.continuations > 0,
        }
        rc = self.rollout
        whole_groups = any(used.values()) or needs.problem_outcomes
        if whole_groups and rc.staleness and rc.async_mode == "streaming":
            raise ValueError(
                f"algorithm {self.algorithm.name!r} computes its credit over whole groups with their "
                f"problems (docs/algorithms.md section 5); rollout.async_mode 'streaming' does not keep "
                f"them: use async_mode 'deterministic'"
            )
        for section, read in used.items():
            changed = [
                k
                for k, v in getattr(self, section)
                if v != type(getattr(self, section)).model_fields[k].default
            ]
            if changed and not read:
                raise ValueError(
                    f"{section}.{changed[0]} is set but algorithm {self.algorithm.name!r} does not use a "
                    f"{section} section (docs/algorithms.md section 5)"
                )
        return self

    @property
    def needs(self):
        """The chosen algorithm's Needs under this config."""
        return build_algorithm(self.algorithm.name, self.algorithm.params()).needs

    @model_validator(mode="after")
    def _check_colocation(self) -> TrainConfig:
        check_colocation(self)
        return self
