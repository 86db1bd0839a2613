"""Synthetic addition with an exact verifier, the quickstart's task.

Warm-up demonstrations come from a noisy teacher that forgets to carry in
`teacher_carry_error` of the problems that need a carry: supervised learning
imitates the mistake, and RL with the verifier is what can remove it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlpost.rewards.base import Problem, Task


def add_without_carry(a: int, b: int) -> int:
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


@dataclass
class Arithmetic(Task):
    digits: int = 2
    teacher_carry_error: float = 0.0

    alphabet = "0123456789+="

    def problems(self, size: int, seed: int) -> list[Problem]:
        rng = random.Random(seed)
        hi = 10**self.digits - 1
        out = []
        for _ in range(size):
            a, b = rng.randint(0, hi), rng.randint(0, hi)
            out.append(Problem(prompt=f"{a}+{b}=", answer=str(a + b), meta={"a": a, "b": b}))
        return out

    def demonstration(self, problem: Problem, rng: random.Random) -> str:
        a, b = problem.meta["a"], problem.meta["b"]
        wrong = add_without_carry(a, b)
        if wrong != a + b and rng.random() < self.teacher_carry_error:
            return str(wrong)
        return problem.answer

    def score(self, response: str, problem: Problem) -> float:
        return 1.0 if response.strip() == problem.answer else 0.0
