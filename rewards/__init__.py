"""Verifiable tasks and rewards (installed as rlpost.rewards)."""
from __future__ import annotations

from rlpost.rewards.arithmetic import Arithmetic
from rlpost.rewards.base import Problem, Task

TASKS: dict[str, type[Task]] = {"arithmetic": Arithmetic}


def build_task(name: str, args: dict) -> Task:
    from rlpost.config import ConfigError

    try:
        return TASKS[name](**args)
    except TypeError as e:
        raise ConfigError(f"key 'task.args': {e}") from None


__all__ = ["TASKS", "Problem", "Task", "build_task"]
