"""The credit-assignment testbed's task: a chain of additions worked step by step.

A prompt is a two-digit number and 3-6 tagged one-digit operands,
`27+a5+b8+c9=`. A response adds the operands one per step, in one of two styles,
and ends with the sum:

    short:  a:27+5=32;b:32+8=40;c:40+9=49;>49
    worked: a:27+5:7+5=12,2+1=3:32;b:32+8:2+8=10,3+1=4:40;c:...;>49

so responses run from about 30 tokens (short, 3 steps) to about 140 (worked, 6
steps), and a group holds both styles. The warm-up teacher picks the worked style
in `worked_rate` of its demonstrations and forgets the carry (a *slip*) in
`teacher_carry_error` of the steps that need one, in either style, so the style is
neutral for the reward. What a slip does to the length is `length_coupling` c:

- c > 0: with probability c the slipped step is re-checked, the teacher writing
  its (wrong) claim twice more, `b:32+8=30~32+8=30~32+8=30;`: wrong responses are
  longer, as a model that flounders is;
- c < 0: with probability -c the teacher gives up after the slip and writes its
  total as the answer, `b:32+8=30;>30`: wrong responses are shorter;
- c = 0: length says nothing about correctness within a group.

The tokens that decide correctness are few (each carry digit, and after a slip
whether to re-check or give up); most others copy or follow from them.

`score` is the outcome reward: the response must parse (every step in either
style, re-checks repeating their step exactly, the right tags in order) and end
with the true sum. `step_scores` is the step verifier, one 0/1 per step a correct
response has: the step must exist and be exact given the previous step's total (so
only the first slip is marked; later steps that carry it forward are not).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlpost.rewards.base import Problem, Task

TAGS = "abcdef"
RECHECKS = r"((?:~\d{1,3}\+\d=\d{1,3})*);"
# re.ASCII everywhere: \d is 0-9 only, not any Unicode digit (int() would read those)
SHORT = re.compile(r"([a-f]):(\d{1,3})\+(\d)=(\d{1,3})" + RECHECKS, re.ASCII)
WORKED = re.compile(
    r"([a-f]):(\d{1,3})\+(\d):(\d)\+(\d)=(\d{1,2}),(\d{1,2})\+(\d)=(\d{1,2}):(\d{1,3})" + RECHECKS,
    re.ASCII,
)
RECHECK_REPEATS = 2
FINAL = re.compile(r">(\d{1,3})", re.ASCII)


@dataclass
class Step:
    tag: str
    total: int  # the running total the step starts from, as written
    operand: int
    result: int  # the total it writes
    exact: bool  # its own arithmetic (the worked style's digits included) is right


def _step(m: re.Match) -> Step:
    """The step a match of SHORT or WORKED writes."""
    *fields, rechecks = m.groups()
    g = [int(x) if x.isdigit() else x for x in fields]
    if len(g) == 4:
        tag, total, operand, result = g
        exact = result == total + operand
    else:
        tag, total, operand, u, d, s, t, c, tc, result = g
        exact = (
            u == total % 10
            and d == operand
            and s == u + d
            and t == total // 10
            and c == s // 10
            and tc == t + c
            and result == 10 * tc + s % 10
        )
    claim = f"~{total}+{operand}={result}"
    exact = exact and rechecks == claim * (len(rechecks) // len(claim))
    return Step(tag, total, operand, result, exact)


def parse(response: str) -> tuple[list[Step], int] | None:
    """The steps and the final answer, or None when the response does not follow the
    grammar (any character outside it, a missing final answer, text after it)."""
    steps, pos = [], 0
    while pos < len(response) and response[pos] != ">":
        m = SHORT.match(response, pos) or WORKED.match(response, pos)
        if m is None:
            return None
        steps.append(_step(m))
        pos = m.end()
    final = FINAL.fullmatch(response, pos)
    return (steps, int(final.group(1))) if final else None


@dataclass
class Chain(Task):
    min_operands: int = 3
    max_operands: int = 6
    teacher_carry_error: float = 0.4
    length_coupling: float = 0.0
    worked_rate: float = 0.5  # how often the teacher writes the worked style

    alphabet = "0123456789+=:,;>" + TAGS

    def __post_init__(self):
        if not 1 <= self.min_operands <= self.max_operands <= len(TAGS):
            raise ValueError(
                f"need 1 <= min_operands <= max_operands <= {len(TAGS)}, "
                f"got {self.min_operands}, {self.max_operands}"
            )
        for name in ("teacher_carry_error", "worked_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not -1.0 <= self.length_coupling <= 1.0:
            raise ValueError(f"length_coupling must be in [-1, 1], got {self.length_coupling}")

    def problems(self, size: int, seed: int) -> list[Problem]:
        rng = random.Random(seed)
        out = []
        for _ in range(size):
            first = rng.randint(10, 39)  # the total stays below 100: 39 + 6 * 9 = 93
            ops = [rng.randint(1, 9) for _ in range(rng.randint(self.min_operands, self.max_operands))]
            prompt = f"{first}" + "".join(f"+{TAGS[i]}{d}" for i, d in enumerate(ops)) + "="
            out.append(Problem(prompt, str(first + sum(ops)), {"first": first, "operands": ops}))
        return out

    def demonstration(self, problem: Problem, rng: random.Random) -> str:
        worked = rng.random() < self.worked_rate
        total, parts = problem.meta["first"], []
        for tag, d in zip(TAGS, problem.meta["operands"]):
            u, t = total % 10, total // 10
            carry = (u + d) // 10
            slip = carry and rng.random() < self.teacher_carry_error
            if slip:
                carry = 0  # the tens digit does not get the carry
            result = 10 * (t + carry) + (u + d) % 10
            work = f":{u}+{d}={u + d},{t}+{carry}={t + carry}:" if worked else "="
            recheck = slip and rng.random() < self.length_coupling
            parts.append(
                f"{tag}:{total}+{d}{work}{result}"
                + f"~{total}+{d}={result}" * (RECHECK_REPEATS * recheck)
                + ";"
            )
            total = result
            if slip and rng.random() < -self.length_coupling:
                break  # gives up: the wrong total becomes the answer
        return "".join(parts) + f">{total}"

    def score(self, response: str, problem: Problem) -> float:
        parsed = parse(response.strip())
        if parsed is None:
            return 0.0
        steps, final = parsed
        ops = problem.meta["operands"]
        well_formed = [s.tag for s in steps] == list(TAGS[: len(ops)])
        return 1.0 if well_formed and str(final) == problem.answer else 0.0

    def step_scores(self, response: str, problem: Problem) -> list[float]:
        """1 for each step of a correct solution that the response writes exactly: the
        right tag, the previous step's written total (the first number for the first),
        the right operand, and exact arithmetic. A response that does not parse scores 0
        on every step."""
        ops = problem.meta["operands"]
        parsed = parse(response.strip())
        if parsed is None:
            return [0.0] * len(ops)
        steps, _ = parsed
        out, total = [], problem.meta["first"]
        for i, d in enumerate(ops):
            s = steps[i] if i < len(steps) else None
            ok = s is not None and s.tag == TAGS[i] and s.total == total and s.operand == d and s.exact
            out.append(1.0 if ok else 0.0)
            if s is not None:
                total = s.result
        return out

    def score_steps(self, problem: Problem, steps: list[str]) -> list[float]:
        """The step verifier over given steps (`step_credit.reward: task`), one score per piece
        of the response (the pieces joined are the response; whitespace around a piece is
        ignored). A piece that is one step (SHORT or WORKED, re-checks included) scores as
        `step_scores` scores that step: 1 when its tag is the next one, it starts from the
        previous step's written total (the first number for the first), adds the right
        operand and its arithmetic is exact. After each step piece, right or wrong, the
        running total is what it wrote and the next tag is expected. The final-answer piece
        (`>49`) scores the outcome, `score` of the whole response. Anything else scores 0,
        a piece holding several steps included (split with `step_credit.split: ";"`)."""
        ops, total, i = problem.meta["operands"], problem.meta["first"], 0
        response, out = "".join(steps), []
        for piece in steps:
            piece = piece.strip()
            m = SHORT.fullmatch(piece) or WORKED.fullmatch(piece)
            if m is not None:
                s = _step(m)
                ok = i < len(ops) and s.tag == TAGS[i] and s.operand == ops[i]
                ok = ok and s.total == total and s.exact
                out.append(1.0 if ok else 0.0)
                total, i = s.result, i + 1
            elif FINAL.fullmatch(piece):
                out.append(self.score(response, problem))
            else:
                out.append(0.0)
        return out
