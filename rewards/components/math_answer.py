"""Math answers: the response's final answer equals the problem's, checked by math-verify.

Both sides are parsed as LaTeX inside \\boxed{...}, so a gold answer may be a plain
number ("-4", "3037") or LaTeX ("\\frac{1}{2}", "x^2+1"), and the response's answer
may be written either way ("0.5", "1/2", "\\frac12" all equal "\\frac{1}{2}").
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from rlpost.rewards.answers import final_answer
from rlpost.rewards.base import Problem, SampleReward, Task


class MathAnswer(SampleReward):
    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, args: Any, task: Task):
        super().__init__(args, task)
        import math_verify  # ~0.4 s: only in the workers that use it
        from math_verify import grader, parser

        # Its own timeouts (SIGALRM) are off: the pool's per-sample timeout is the limit,
        # which is what the warning it would print once per process asks for.
        grader.TIMEOUT_WARNING_SHOWN = parser.TIMEOUT_WARNING_SHOWN = True
        self.math_verify = math_verify

    def parse(self, answer: str) -> list:
        return self.math_verify.parse(f"\\boxed{{{answer}}}", parsing_timeout=None)

    def __call__(self, response: str, problem: Problem) -> float:
        gold = self.parse(problem.answer)
        if not gold:
            raise ValueError(f"math-verify cannot parse the problem's answer {problem.answer!r}")
        predicted = final_answer(response)
        if predicted is None:
            return 0.0
        return float(self.math_verify.verify(gold, self.parse(predicted), timeout_seconds=None))
