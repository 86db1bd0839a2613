"""Verifiable tasks and rewards (installed as rlpost.rewards)."""

from __future__ import annotations

from rlpost.rewards.base import Problem, Task
from rlpost.rewards.tasks.arithmetic import Arithmetic
from rlpost.rewards.tasks.chain import Chain

TASKS: dict[str, type[Task]] = {"arithmetic": Arithmetic, "chain": Chain}


def build_task(name: str, args: dict) -> Task:
    """A task of TASKS, or `reasoning_gym:<dataset>` with the dataset's config as args."""
    from rlpost.errors import ConfigError
    from rlpost.rewards.tasks.reasoning_gym import PREFIX, ReasoningGym

    if name.startswith(PREFIX):
        return ReasoningGym(name.removeprefix(PREFIX), dict(args))
    if name not in TASKS:
        raise ConfigError(
            f"key 'task.name': unknown task {name!r}; known: "
            f"{', '.join(sorted(TASKS))}, or {PREFIX}<name> for a reasoning-gym task"
        )
    try:
        return TASKS[name](**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"key 'task.args': {e}") from None


__all__ = ["TASKS", "Problem", "Task", "build_task"]
