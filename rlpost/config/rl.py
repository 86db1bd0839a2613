"""The config of `rlpost train CONFIG`: the RL job."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from rlpost.algorithms.base import AlgoConfig, PolicyGradient
from rlpost.config.placement import placement_problem
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


class TrainConfig(Section):
    name: str = "run"
    seed: int = 0
    mode: Literal["ray", "inprocess"] = "ray"
    steps: int = Field(50, ge=0)
    eval_every: int = Field(0, ge=0, description="0: evaluate only before and after RL")
    save_every: int = Field(0, ge=0, description="0: only a final checkpoint")
    output_dir: str = "runs"
    resume: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    # the chosen algorithm's Config with its `name` (`algorithm_section`); serialised as
    # that class, so config.yaml holds every default
    algorithm: SerializeAsAny[AlgoConfig] = Field(
        default_factory=lambda: algorithm_section({}, PolicyGradient)
    )
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("algorithm", mode="before")
    @classmethod
    def _typed_algorithm(cls, value):
        return algorithm_section(value, PolicyGradient)

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
        if self.rollout.overlong_buffer and any(c.name == "overlong" for c in self.reward.components):
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
