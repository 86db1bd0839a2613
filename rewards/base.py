"""The task interface: prompts, warm-up demonstrations and a verifier."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class Problem:
    """One prompt and what its rewards check it against.

    `prompt` is a problem's text (shown as a user message, or as plain text) or a
    conversation, a list of {"role", "content"} messages (a prompt read from a file).
    `source` names where it comes from (a file row's `data_source`, or the task's name):
    rewards route by it and metrics are split by it. A row read from a file keeps the
    row's whole record in `meta["fields"]`."""

    prompt: str | list[dict[str, str]]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def fields(self) -> dict[str, Any]:
        """The fields of the file row this problem was read from ({} for a generated one)."""
        return self.meta.get("fields", {})


class Task:
    """A verifiable task. Subclasses are dataclasses whose fields are `task.args`."""

    # Characters a code-built tokenizer needs to cover prompts and answers.
    alphabet: ClassVar[str] = ""

    def problems(self, size: int, seed: int) -> list[Problem]:
        raise NotImplementedError

    def demonstration(self, problem: Problem, rng: random.Random) -> str:
        """A target response for supervised warm-up."""
        return problem.answer

    def score(self, response: str, problem: Problem) -> float:
        raise NotImplementedError

    def score_steps(self, problem: Problem, steps: list[str]) -> list[float]:
        """The step verifier (`step_credit.reward: task`): one score per step of a response
        (`steps` are its pieces, in order; joined they are the response). Optional: a task
        without one leaves it unimplemented."""
        raise NotImplementedError(
            f"task {type(self).__name__} has no step verifier (Task.score_steps); set "
            "step_credit.reward to a function 'pkg.module:function' taking (problem, steps)"
        )

    def prepare(self) -> None:
        """Load what `score` needs (imports, data); each scoring process calls this once
        when it starts, so that no sample's timeout pays for it."""


class SampleReward:
    """A reward component that reads one response. Built from its validated `Args`
    inside each scoring worker process, and called there under the pool's timeout."""

    Args: ClassVar[type]  # what `args` of its config must be (validated with pydantic)

    def __init__(self, args: Any, task: Task):
        self.args = args

    def __call__(self, response: str, problem: Problem) -> float:
        raise NotImplementedError


class LengthReward:
    """A reward component that depends only on response lengths (tokens, as the caller
    counts them). Arithmetic that cannot hang: computed on the controller, per batch."""

    Args: ClassVar[type]

    def __init__(self, args: Any):
        self.args = args

    def __call__(self, lengths: list[int]) -> list[float]:
        raise NotImplementedError
