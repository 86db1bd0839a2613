"""Code: the response's program, run in the sandbox against the problem's tests.

`problem.meta["tests"]` is a list of {"input": stdin, "output": expected stdout}
(an optional "argv" list too). The score is the fraction of tests whose run exits
with status 0 within the limits and prints the expected output (compared line by
line, ignoring trailing whitespace). The program is the last ```python fenced
block of the response, or the whole response. The args are the sandbox `Limits`
of one run; all the runs of one sample share the pool's `timeout_s`.
"""

from __future__ import annotations

from rlpost.rewards.answers import code_block
from rlpost.rewards.base import Problem, SampleReward, Task
from rlpost.rewards.scoring.sandbox import Limits, check_available, run_python


def normalise_output(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


class CodeTests(SampleReward):
    Args = Limits

    def __init__(self, args: Limits, task: Task):
        super().__init__(args, task)
        check_available()  # fail when the pool starts, not as a zero on every sample

    def __call__(self, response: str, problem: Problem) -> float:
        tests = problem.meta.get("tests")
        if not tests:
            raise ValueError("the problem has no meta['tests'] for the code reward")
        program = code_block(response)
        passed = 0
        for test in tests:
            result = run_python(program, test.get("input", ""), test.get("argv", ()), self.args)
            expected = normalise_output(test["output"])
            passed += result.ok and normalise_output(result.stdout) == expected
        return passed / len(tests)
