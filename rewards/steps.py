"""What scores each step of a response (`step_credit.reward`, docs/algorithms.md section 5).

"task" is the task's step verifier, `Task.score_steps`; "pkg.module:function" is a function
of yours taking (problem, steps: list[str]) and returning one float per step. Either way
the scorer checks what comes back: a list of finite floats, one per step, so that a wrong
count or a NaN fails naming the function and the problem, never as a shape error deep in
an advantage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

from rlpost.errors import ConfigError
from rlpost.rewards.base import Problem, Task
from rlpost.rewards.components.function import import_function


def _prompt_text(problem: Problem) -> str:
    """The prompt's text: itself, or a conversation's last message."""
    prompt = problem.prompt
    if isinstance(prompt, str):
        return prompt
    return str(prompt[-1].get("content", "")) if prompt else ""


class StepScorer:
    """`fn(problem, steps)`, its result checked; picklable when `fn` is (a module-level
    function, or a bound method of a picklable task)."""

    def __init__(self, fn: Callable[[Problem, list[str]], list[float]], name: str):
        self.fn, self.name = fn, name

    def __call__(self, problem: Problem, steps: list[str]) -> list[float]:
        result = self.fn(problem, steps)
        where = f"step_credit.reward {self.name} on the problem {_prompt_text(problem)[:60]!r}"
        if not isinstance(result, (list, tuple)):
            raise ValueError(
                f"{where}: returned {type(result).__name__}, not a list of floats (one per step)"
            )
        if len(result) != len(steps):
            raise ValueError(f"{where}: returned {len(result)} scores for {len(steps)} steps")
        bad = [x for x in result if isinstance(x, bool) or not isinstance(x, Real) or not math.isfinite(x)]
        if bad:
            raise ValueError(
                f"{where}: {bad[0]!r} is not a finite float ({len(result)} scores, {len(steps)} steps)"
            )
        return [float(x) for x in result]


def step_scorer(spec: str, task: Task) -> Callable[[Problem, list[str]], list[float]]:
    """The scorer `step_credit.reward` names; a ConfigError naming the key when it names no
    function, or "task" and the task has no step verifier."""
    if spec == "task":
        if type(task).score_steps is Task.score_steps:
            raise ConfigError(
                f"key 'step_credit.reward': task {type(task).__name__} has no step verifier "
                "(Task.score_steps); set step_credit.reward to a function 'pkg.module:function' "
                "taking (problem, steps)"
            )
        return StepScorer(task.score_steps, f"{type(task).__name__}.score_steps")
    try:
        fn = import_function(spec)
    except ValueError as e:
        raise ConfigError(f"key 'step_credit.reward': {e} (or 'task' for the task's step verifier)") from None
    return StepScorer(fn, spec)
