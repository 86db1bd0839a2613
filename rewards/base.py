"""The task interface: prompts, warm-up demonstrations and a verifier."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class Problem:
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


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
