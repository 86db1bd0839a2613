"""A reward function of yours, by import path 'package.module:function'.

It is called as `fn(response, problem, **kwargs)`, where the keyword arguments are
the fields of the file row the problem was read from (`problem.fields`), as TRL passes
dataset columns to its reward functions, and then the config's `kwargs`, which win over
a field of the same name. It receives only the fields its signature takes: those it
names as parameters, or all of them when it has `**kwargs`; so `fn(response, problem)`
receives none, and a field named like its first two parameters never replaces the
response or the problem.

```python
def judge(response, problem, difficulty=None, strict=False, **_):
    ...  # difficulty: a column of the row; strict: from the config's kwargs
```

It runs unsandboxed in the reward pool's scoring processes (rewards/scoring/process.py),
never on the controller. Whatever it does there costs at most the samples it was
called on: raising, exiting (sys.exit, os._exit), crashing the process (a segfault),
hanging past `reward.timeout_s` (even in C code holding the GIL) or running out of
memory (`reward.memory_mb`) scores that call 0, counted by kind in reward/failures/*;
the process is replaced and its process group and descendants are killed. Its stdout
and stderr reach the run's stderr (up to 64 KiB per chunk of samples; the rest is
dropped, so a flood cannot block it); stdin is empty; streams it closes are restored
for the next call. State it keeps between calls lives until its process is replaced.
"""

from __future__ import annotations

import importlib
import inspect
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


def accepted_fields(fn: Callable) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A filter keeping the fields `fn` can take by keyword after (response, problem)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins): pass none
        return lambda fields: {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    taken = {p.name for p in positional[:2]}  # they bind the response and the problem
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return lambda fields: {k: v for k, v in fields.items() if isinstance(k, str) and k not in taken}
    names = {
        p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in taken
    }
    return lambda fields: {k: v for k, v in fields.items() if k in names}


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
        self.fields = accepted_fields(self.fn)

    def __call__(self, response: str, problem: Problem) -> float:
        return self.fn(response, problem, **{**self.fields(problem.fields), **self.args.kwargs})
