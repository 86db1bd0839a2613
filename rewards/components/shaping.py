"""Shaping rewards: the response's format, and its length."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rlpost.rewards.base import LengthReward, Problem, SampleReward, Task


class Format(SampleReward):
    """1 if the whole (stripped) response matches `pattern` (re.DOTALL), else 0."""

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        pattern: str = r"<think>.*?</think>\s*<answer>.*?</answer>"

        @field_validator("pattern")
        @classmethod
        def _compiles(cls, pattern: str) -> str:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a regular expression: {e}") from None
            return pattern

    def __init__(self, args: Args, task: Task):
        super().__init__(args, task)
        self.pattern = re.compile(args.pattern, re.DOTALL)

    def __call__(self, response: str, problem: Problem) -> float:
        return 1.0 if self.pattern.fullmatch(response.strip()) else 0.0


class TargetLength(LengthReward):
    """-|length - target| / tolerance, floored at -1: 0 on target, -1 at `tolerance`
    or more tokens away."""

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        target: int = Field(gt=0)
        tolerance: int = Field(gt=0)

    def __call__(self, lengths: list[int]) -> list[float]:
        a = self.args
        return [-min(1.0, abs(n - a.target) / a.tolerance) for n in lengths]


class Overlong(LengthReward):
    """DAPO's overlong shaping (rlpost.algorithms.dapo.overlong_penalty): 0 up to
    max_length - buffer, a linear ramp to -1 at max_length, -1 beyond."""

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        max_length: int = Field(gt=0)
        buffer: int = Field(gt=0)

        @model_validator(mode="after")
        def _fits(self) -> Overlong.Args:
            if self.buffer > self.max_length:
                raise ValueError(f"buffer ({self.buffer}) must not exceed max_length ({self.max_length})")
            return self

    def __init__(self, args: Any):
        super().__init__(args)
        import torch

        from rlpost.algorithms.dapo import overlong_penalty

        self.torch, self.penalty = torch, overlong_penalty

    def __call__(self, lengths: list[int]) -> list[float]:
        a = self.args
        return self.penalty(self.torch.tensor(lengths), a.max_length, a.buffer).tolist()
