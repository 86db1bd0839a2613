"""Code: the response's program, run in the sandbox against the problem's tests.

The tests are `problem.meta["tests"]`, a list of {"input": stdin, "output": expected
stdout} (an optional "argv" list too), else the problem's answer read as JSON, as verl
and PRIME store code tests in a row's ground truth: either such a list, or
{"inputs": [stdin, ...], "outputs": [stdout, ...]} (an "fn_name" key is ignored: every
test is a stdin/stdout test). An input or output given as a list of lines is joined
with newlines. The score is the fraction of tests whose run exits with status 0 within
the limits and prints the expected output (compared line by line, ignoring trailing
whitespace). The program is the last ```python fenced block of the response, or the
whole response. The args are the sandbox `Limits` of one run; all the runs of one sample
share the pool's `timeout_s`.
"""

from __future__ import annotations

import json
from typing import Any

from rlpost.rewards.answers import code_block
from rlpost.rewards.base import Problem, SampleReward, Task
from rlpost.rewards.scoring.sandbox import Limits, check_available, run_python

SHAPES = 'a list of {"input", "output"} or {"inputs": [...], "outputs": [...]}'


def normalise_output(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def as_text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return "\n".join(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"a test's {what} must be text (or a list of lines), got {value!r:.80}")


def answer_tests(answer: str) -> list[dict[str, Any]]:
    """The tests a JSON answer holds, as {"input", "output"} dicts."""
    try:
        data = json.loads(answer)
    except ValueError:
        raise ValueError(
            f"the problem has no meta['tests'] and its answer {answer[:80]!r} is not JSON tests ({SHAPES})"
        ) from None
    if isinstance(data, dict) and "inputs" in data and "outputs" in data:
        inputs, outputs = data["inputs"], data["outputs"]
        if not (isinstance(inputs, list) and isinstance(outputs, list) and len(inputs) == len(outputs)):
            raise ValueError("the answer's JSON tests need lists 'inputs' and 'outputs' of equal length")
        return [{"input": i, "output": o} for i, o in zip(inputs, outputs)]
    if isinstance(data, list) and all(isinstance(t, dict) for t in data):
        return data
    raise ValueError(f"the problem's answer is JSON but not tests: expected {SHAPES}, got {answer[:80]!r}")


def problem_tests(problem: Problem) -> list[dict[str, Any]]:
    tests = problem.meta.get("tests") or answer_tests(problem.answer)
    if not tests:
        raise ValueError("the problem's tests are an empty list")
    for test in tests:
        if "output" not in test:
            raise ValueError(f"a test without an 'output': {test!r:.80}")
    return tests


class CodeTests(SampleReward):
    Args = Limits

    def __init__(self, args: Limits, task: Task):
        super().__init__(args, task)
        check_available()  # fail when the pool starts, not as a zero on every sample

    def __call__(self, response: str, problem: Problem) -> float:
        tests = problem_tests(problem)
        program = code_block(response)
        passed = 0
        for test in tests:
            stdin = as_text(test.get("input", ""), "input")
            result = run_python(program, stdin, test.get("argv", ()), self.args)
            expected = normalise_output(as_text(test["output"], "output"))
            passed += result.ok and normalise_output(result.stdout) == expected
        return passed / len(tests)
