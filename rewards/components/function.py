"""A reward function of yours, by import path 'package.module:function'."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlpost.rewards.base import Problem, SampleReward, Task


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
