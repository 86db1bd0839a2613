"""Each reward component on hand-written cases: right, wrong, malformed, adversarial."""

from __future__ import annotations

import json

import pytest
import torch

from rlpost.algorithms.dapo import overlong_penalty
from rlpost.rewards import build_task
from rlpost.rewards.answers import code_block, final_answer
from rlpost.rewards.base import Problem
from rlpost.rewards.components import COMPONENTS, validate_args


def component(name: str, task=None, **args):
    return COMPONENTS[name](validate_args(name, args), task)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so it is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{\sqrt{x^{2}}}", r"\sqrt{x^{2}}"),  # the last, nested braces
        ("The answer is 42.", "42"),
        ("answer: $x^2$", "x^2"),
        ("we get 1,234 and then -5.5", "-5.5"),
        ("<think>7</think><answer>-4</answer>", "-4"),
        (r"<answer>\boxed{3}</answer> and 9", "3"),
        ("<answer></answer> 5", None),  # an empty answer is no answer
        ("no numbers here", None),
        ("", None),
        (r"\boxed{}", None),
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_code_block():
    assert code_block("see\n```python\nprint(1)\n```\nand\n```\nprint(2)\n```") == "print(2)\n"
    assert code_block("print(3)") == "print(3)"


@pytest.fixture(scope="module")
def math_reward():
    return component("math")


@pytest.mark.parametrize(
    "gold, response, expected",
    [
        (r"\frac{1}{2}", r"so \boxed{0.5}", 1.0),
        (r"\frac{1}{2}", "The answer is 1/2.", 1.0),
        (r"\frac{1}{2}", r"<answer>\frac12</answer>", 1.0),
        (r"\frac{1}{2}", r"\boxed{\frac{1}{3}}", 0.0),
        ("-4", "<answer>-4</answer>", 1.0),
        ("-4", "it is 4", 0.0),
        ("3037", "so 3,037 in total", 1.0),
        ("x^2+1", r"\boxed{1+x^2}", 1.0),
        (r"\sqrt{2}", r"answer: $\sqrt 2$", 1.0),
        (r"\frac{1}{2}", "I don't know", 0.0),
        (r"\frac{1}{2}", r"\boxed{\frac{1}{2", 0.0),  # unbalanced: falls back to the last number
        (r"\frac{1}{2}", "", 0.0),
    ],
)
def test_math(math_reward, gold, response, expected):
    assert math_reward(response, Problem("", gold)) == expected


def test_math_on_reasoning_gym_numbers(math_reward):
    task = build_task("reasoning_gym:chain_sum", {})
    for p in task.problems(5, seed=0):
        assert math_reward(f"<answer>{p.answer}</answer>", p) == 1.0
        assert math_reward(f"<answer>{int(p.answer) + 1}</answer>", p) == 0.0


def test_math_gold_answer_that_cannot_be_parsed_raises(math_reward):
    with pytest.raises(ValueError, match="cannot parse the problem's answer"):
        math_reward("1", Problem("", ""))


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>a</think><answer>1</answer>", 1.0),
        ("  <think>\nlong\n</think>\n\n<answer>1</answer>\n", 1.0),
        ("<answer>1</answer>", 0.0),
        ("<think>a</think><answer>1</answer> trailing", 0.0),
        ("<think>a<answer>1</answer>", 0.0),
    ],
)
def test_format(response, expected):
    assert component("format")(response, Problem("", "")) == expected


def test_format_custom_pattern():
    assert component("format", pattern=r"\d+")("123", Problem("", "")) == 1.0
    assert component("format", pattern=r"\d+")("12a", Problem("", "")) == 0.0


def test_length_rewards():
    def length_component(name, **args):
        return COMPONENTS[name](validate_args(name, args))

    assert length_component("length", target=10, tolerance=4)([10, 8, 13, 14, 100]) == [
        0.0,
        -0.5,
        -0.75,
        -1.0,
        -1.0,
    ]
    lengths = [0, 6, 7, 9, 10, 11]
    expected = overlong_penalty(torch.tensor(lengths), 10, 4).tolist()
    assert length_component("overlong", max_length=10, buffer=4)(lengths) == expected
    assert expected == pytest.approx([0.0, 0.0, -0.25, -0.75, -1.0, -1.0])


def test_task_score_component_is_the_task_verifier():
    task = build_task("arithmetic", {})
    p = task.problems(1, seed=0)[0]
    score = component("task", task)
    assert score(p.answer, p) == 1.0 and score(p.answer + "0", p) == 0.0


def named_fields(response: str, problem: Problem, difficulty: float, scale: float = 1.0) -> float:
    return difficulty * scale


def any_fields(response, problem, **kwargs) -> float:
    """Encodes what it received: a digit per keyword, in name order (1 per field)."""
    assert problem.answer == "42" and response == "r"  # never replaced by a field
    return float("".join(str(int(kwargs[k])) for k in sorted(kwargs)) or "0")


def test_user_function_receives_the_row_fields_it_takes():
    row = {"difficulty": 3.0, "scale": 2.0, "other": "x", "response": "field", "problem": "field"}
    problem = Problem("", "42", {"fields": row})
    named = "tests.rewards.test_rewards_components:named_fields"
    assert component("function", path=named)("r", problem) == 6.0  # 3 * 2: fields it names
    assert component("function", path=named, kwargs={"scale": 5})("r", problem) == 15.0  # kwargs win
    with pytest.raises(TypeError, match="difficulty"):  # no such field: the call says so
        component("function", path=named)("r", Problem("", "42"))
    # **kwargs takes every field but the two that would replace its arguments
    anything = "tests.rewards.test_rewards_components:any_fields"
    row = {"a": 1, "b": 2, "response": 9, "problem": 9}
    assert component("function", path=anything)("r", Problem("", "42", {"fields": row})) == 12.0
    fn = component("function", path=anything, kwargs={"b": 7, "c": 0})
    assert fn("r", Problem("", "42", {"fields": row})) == 170.0
    # without fields or kwargs: fn(response, problem), as before
    assert component("function", path=anything)("r", Problem("", "42")) == 0.0


def test_user_function_with_kwargs():
    fn = component("function", path="tests.rewards.test_rewards_pool:length_or_raise", kwargs={"limit": 2})
    assert fn("abcdef", Problem("", "")) == 2.0
    with pytest.raises(ValueError):
        fn("bad", Problem("", ""))


SUM = Problem(
    "",
    "",
    {
        "tests": [
            {"input": "1 2\n", "output": "3\n"},
            {"input": "5 7\n", "output": "12"},
            {"input": "-1 1\n", "output": "0"},
        ]
    },
)


@pytest.fixture(scope="module")
def code_reward():
    return component("code", cpu_s=1, wall_s=2.0)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("```python\na, b = map(int, input().split())\nprint(a + b)\n```", 1.0),
        ("Here:\n```py\nimport sys\nprint(sum(map(int, sys.stdin.read().split())))  \n```", 1.0),
        ("print(3)", 1 / 3),  # right on the first test only
        ("a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(1)", 0.0),  # exit status
        ("print(", 0.0),  # syntax error
        ("", 0.0),
        # right, then flooding the output past the cap
        ("a, b = map(int, input().split())\nprint(a + b)\nprint('x' * (2 << 20))", 0.0),
    ],
)
def test_code(code_reward, response, expected):
    assert code_reward(response, SUM) == pytest.approx(expected)


def test_code_argv_and_missing_tests(code_reward):
    argv = Problem("", "", {"tests": [{"argv": ["x", "y"], "output": "x-y"}]})
    assert code_reward("import sys\nprint('-'.join(sys.argv[1:]))", argv) == 1.0
    with pytest.raises(ValueError, match="no meta"):
        code_reward("print(1)", Problem("", ""))


ADD = "a, b = map(int, input().split())\nprint(a + b)"


@pytest.mark.parametrize(
    "tests",
    [
        [
            {"input": "1 2\n", "output": "3\n"},
            {"input": "5 7", "output": "12"},
            {"input": "2 2", "output": "5"},
        ],
        # verl / PRIME: parallel lists, an fn_name ignored, an output as a list of lines
        {"inputs": ["1 2\n", "5 7", "2 2"], "outputs": ["3\n", ["12"], "5"], "fn_name": None},
    ],
)
def test_code_tests_from_a_json_answer(code_reward, tests):
    problem = Problem("", json.dumps(tests))
    assert code_reward(ADD, problem) == pytest.approx(2 / 3)  # the third test expects 5
    assert code_reward("print(3)", problem) == pytest.approx(1 / 3)
    # meta['tests'] comes first
    assert (
        code_reward(ADD, Problem("", json.dumps(tests), {"tests": [{"input": "2 2", "output": "4"}]})) == 1.0
    )


@pytest.mark.parametrize(
    "answer, message",
    [
        ("3", "is JSON but not tests: expected a list"),
        ('{"inputs": ["1"]}', "is JSON but not tests"),
        ('{"inputs": ["1"], "outputs": []}', "lists 'inputs' and 'outputs' of equal length"),
        ("[]", "tests are an empty list"),
        ('[{"input": "1"}]', "a test without an 'output'"),
        ('[{"input": {"x": 1}, "output": "1"}]', "a test's input must be text"),
    ],
)
def test_code_tests_that_cannot_be_read_say_why(code_reward, answer, message):
    with pytest.raises(ValueError, match=message):
        code_reward("print(1)", Problem("", answer))
