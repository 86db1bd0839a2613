"""The sections of credit beyond the outcome (docs/algorithms.md section 5): the critic,
the implicit PRM and where a response's steps end. Each is read only when the algorithm's
`Needs` ask for it; a set key the algorithm would not read is refused (TrainConfig)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlpost.config.base import Section


class ModelRoleConfig(Section):
    """A second model the RL job trains beside the policy, with its own DeepSpeed group of
    `learner.num_learners` ranks (same ZeRO stage, micro-batches and precision as the
    policy's learners), optimizer and learning rate."""

    model: str | None = Field(
        None, description="HF directory to start from; None: the policy's starting model (after the warm-up)"
    )
    lr: float = Field(1e-5, gt=0)
    lr_warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear LR warm-up")
    placement: Literal["separate", "with_learners"] = Field(
        "separate",
        description="separate: bundles of its own, like the learners'; with_learners: rank r shares "
        "learner r's bundle (and GPU: each takes half of ray.gpus_per_learner)",
    )


class CriticConfig(ModelRoleConfig):
    """PPO's value model: the LM's final states through a linear value head (zero at start)."""

    value_clip: float | None = Field(
        0.2, gt=0, description="eps_v of the clipped value loss; None: the plain squared error"
    )
    warmup_steps: int = Field(
        0, ge=0, description="first RL steps that train the critic alone (the policy holds still)"
    )


class PRMConfig(ModelRoleConfig):
    """PRIME's implicit PRM pi_phi, a causal LM trained online on outcome labels; its
    reference pi_ref is the frozen copy of its starting model."""

    lr: float = Field(1e-6, gt=0)


class StepsConfig(Section):
    """Where a response's steps end, for step-level credit (VinePPO, process rewards)."""

    split: str = Field(
        "\n",
        min_length=1,
        description="a regular expression whose matches end a step (the match belongs to the step "
        "it ends), or 'pkg.module:function' taking the response text and returning the character "
        "offsets where its steps end",
    )
    min_chars: int = Field(
        0, ge=0, description="a step shorter than this many characters is merged into the next"
    )
    reward: str = Field(
        "task",
        description="what scores each step: 'task' (the task's step verifier, Task.score_steps) or "
        "'pkg.module:function' taking (problem, steps: list[str]) and returning one float per step",
    )
