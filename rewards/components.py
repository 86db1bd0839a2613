"""The reward components a `reward:` config can name, and how their args are checked."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from rlpost.rewards.base import LengthReward, Problem, SampleReward, Task
from rlpost.rewards.code_tests import CodeTests
from rlpost.rewards.math_answer import MathAnswer
from rlpost.rewards.shaping import Format, Overlong, TargetLength


class TaskScore(SampleReward):
    """The task's own verifier (`Task.score`): the default reward."""

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, args: Args, task: Task):
        super().__init__(args, task)
        self.task = task
        task.prepare()

    def __call__(self, response: str, problem: Problem) -> float:
        return self.task.score(response, problem)


def import_function(path: str) -> Callable:
    """'package.module:function' -> the function."""
    module, sep, name = path.partition(":")
    if not (module and sep and name):
        raise ValueError(f"{path!r} is not of the form 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {path!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn


class UserFunction(SampleReward):
    """A function of yours, `fn(response, problem, **kwargs) -> float`, by import path.
    It must be importable in the workers too (installed, or on PYTHONPATH)."""

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str
        kwargs: dict[str, Any] = Field(default_factory=dict)

        @field_validator("path")
        @classmethod
        def _importable(cls, path: str) -> str:
            import_function(path)
            return path

    def __init__(self, args: Args, task: Task):
        super().__init__(args, task)
        self.fn = import_function(args.path)

    def __call__(self, response: str, problem: Problem) -> float:
        return self.fn(response, problem, **self.args.kwargs)


COMPONENTS: dict[str, type[SampleReward] | type[LengthReward]] = {
    "task": TaskScore,
    "math": MathAnswer,
    "code": CodeTests,
    "format": Format,
    "function": UserFunction,
    "length": TargetLength,
    "overlong": Overlong,
}


def validate_args(name: str, args: dict[str, Any]) -> Any:
    """The component's validated args (raises pydantic.ValidationError)."""
    return TypeAdapter(COMPONENTS[name].Args).validate_python(args)
