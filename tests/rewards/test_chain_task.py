"""The testbed's chain task: its generator, its outcome and step verifiers, and the
length coupling it is built to dial."""

import random
import statistics

import pytest

from rlpost.errors import ConfigError
from rlpost.rewards import build_task
from rlpost.rewards.base import Problem
from rlpost.rewards.tasks.chain import Chain

# 27 + 5 + 8 + 9 = 49; the first two steps carry (7+5, 2+8), the third does not... 40+9
P = Problem("27+a5+b8+c9=", "49", {"first": 27, "operands": [5, 8, 9]})
SHORT = "a:27+5=32;b:32+8=40;c:40+9=49;>49"
WORKED = "a:27+5:7+5=12,2+1=3:32;b:32+8:2+8=10,3+1=4:40;c:40+9:0+9=9,4+0=4:49;>49"


def test_problems_are_reproducible_and_stay_two_digit():
    task = Chain()
    a, b = task.problems(500, seed=3), task.problems(500, seed=3)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert a[0].prompt != task.problems(1, seed=4)[0].prompt
    for p in a:
        first, ops = p.meta["first"], p.meta["operands"]
        assert 3 <= len(ops) <= 6 and 10 <= first <= 39 and all(1 <= d <= 9 for d in ops)
        assert int(p.answer) == first + sum(ops) < 100
        assert p.prompt == f"{first}" + "".join(f"+{'abcdef'[i]}{d}" for i, d in enumerate(ops)) + "="
        assert set(p.prompt) <= set(task.alphabet)


@pytest.mark.parametrize("response", [SHORT, WORKED, " " + SHORT + "\n"])
def test_right_answers_in_either_style_pass_every_step(response):
    task = Chain()
    assert task.score(response, P) == 1.0
    assert task.step_scores(response, P) == [1.0, 1.0, 1.0]


def test_a_mixed_style_response_and_exact_rechecks_are_right():
    task = Chain()
    mixed = "a:27+5=32~27+5=32;b:32+8:2+8=10,3+1=4:40;c:40+9=49;>49"
    assert task.score(mixed, P) == 1.0 and task.step_scores(mixed, P) == [1.0, 1.0, 1.0]


def test_the_outcome_reward_reads_the_end_and_the_step_verifier_the_steps():
    task = Chain()
    # a re-check that does not repeat its step: the answer is right, the step is not exact
    odd = "a:27+5=32~27+5=33;b:32+8=40;c:40+9=49;>49"
    assert task.score(odd, P) == 1.0 and task.step_scores(odd, P) == [0.0, 1.0, 1.0]


def test_a_slip_marks_only_its_own_step():
    task = Chain()
    # forgets the carry at step b (32+8 -> 30), then adds 9 to its own total correctly
    slipped = "a:27+5=32;b:32+8=30;c:30+9=39;>39"
    assert task.score(slipped, P) == 0.0
    assert task.step_scores(slipped, P) == [1.0, 0.0, 1.0]
    # in the worked style the slip is the carry digit: 3+0 where 2+8=10 needs 3+1
    worked = "a:27+5:7+5=12,2+1=3:32;b:32+8:2+8=10,3+0=3:30;c:30+9:0+9=9,3+0=3:39;>39"
    assert task.score(worked, P) == 0.0
    assert task.step_scores(worked, P) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "response, steps",
    [
        ("a:27+5=32;b:32+8=40;>40", [1.0, 1.0, 0.0]),  # gave up (or stopped) early
        ("a:27+5=32;b:32+8=40;c:40+9=49;>48", [1.0, 1.0, 1.0]),  # steps right, answer not
        ("a:27+5=32;c:32+8=40;b:40+9=49;>49", [1.0, 0.0, 0.0]),  # tags out of order
        ("a:27+5=32;b:32+9=41;c:41+9=50;>50", [1.0, 0.0, 1.0]),  # copied the wrong operand
        # the worked digits disagree with the claim (2+8 written as 11)
        ("a:27+5=32;b:32+8:2+8=11,3+1=4:41;c:41+9=50;>50", [1.0, 0.0, 1.0]),
        ("a:27+5=32;b:32+8=40;c:40+9=49;d:49+1=50;>50", [1.0, 1.0, 1.0]),  # a step too many
    ],
)
def test_wrong_responses_fail_and_their_steps_are_marked(response, steps):
    task = Chain()
    assert task.score(response, P) == 0.0
    assert task.step_scores(response, P) == steps


@pytest.mark.parametrize(
    "response",
    [
        "",
        ">49",  # the answer without the work
        "49",
        "a:27+5=32;b:32+8=40;c:40+9=49;",  # no final answer
        "a:27+5=32;b:32+8=40;c:40+9=49;>49>49",
        "a:27+5=32;b:32+8=40;c:40+9=49;>49;",
        "a:27+5=32;b:32+8=40;c:40+9=49;>049x",
        "a:27+5=32;b:32+8=40;c:40+9=49;>٤٩",  # Arabic-Indic digits
        "a:27+5=32;b:32+8=40;c:40+9=49;>" + "9" * 5000,
        "a:27+5=32;b:32+8=40;c:40+9=49;\n>49",
        "A:27+5=32;b:32+8=40;c:40+9=49;>49",
        "a:27+5=32;b:32+8=40;c:40+9=49;>49" + "\x00",
    ],
)
def test_malformed_and_adversarial_responses_score_zero(response):
    task = Chain()
    assert task.score(response, P) == 0.0
    assert sum(task.step_scores(response, P)) <= 3
    if response in ("", ">49", "49"):
        assert task.step_scores(response, P) == [0.0, 0.0, 0.0]


def test_demonstrations_parse_and_their_verifiers_agree():
    for coupling in (-1.0, -0.3, 0.0, 0.4, 1.0):
        task = Chain(teacher_carry_error=0.6, length_coupling=coupling)
        rng = random.Random(0)
        for p in task.problems(300, seed=1):
            d = task.demonstration(p, rng)
            steps = task.step_scores(d, p)
            assert task.score(d, p) == float(all(steps))


def _length_gap(coupling: float, error: float = 0.6) -> float:
    """Mean over groups of 8 teacher samples holding both outcomes: the mean length of
    the wrong ones minus the mean length of the right ones."""
    task = Chain(teacher_carry_error=error, length_coupling=coupling)
    rng, gaps = random.Random(7), []
    for p in task.problems(400, seed=2):
        group = [task.demonstration(p, rng) for _ in range(8)]
        ok = [task.score(d, p) == 1.0 for d in group]
        if any(ok) and not all(ok):
            right = statistics.mean(len(d) for d, k in zip(group, ok) if k)
            wrong = statistics.mean(len(d) for d, k in zip(group, ok) if not k)
            gaps.append(wrong - right)
    return statistics.mean(gaps)


def test_the_length_gap_grows_with_the_coupling():
    gaps = {c: _length_gap(c) for c in (-1.0, -0.5, 0.0, 0.5, 1.0)}
    values = list(gaps.values())
    assert values == sorted(values), gaps
    assert abs(gaps[0.0]) < 2.0  # no coupling: length says nothing within a group
    assert gaps[1.0] > 15.0 and gaps[-1.0] < -20.0  # measured about +23 and -33 tokens
    # the coupling moves length, not accuracy
    task = Chain(teacher_carry_error=0.6)
    rng = random.Random(3)
    acc = {}
    for c in (-1.0, 0.0, 1.0):
        task.length_coupling = c
        ps = task.problems(2000, seed=5)
        acc[c] = statistics.mean(task.score(task.demonstration(p, rng), p) for p in ps)
    assert max(acc.values()) - min(acc.values()) < 0.03, acc


@pytest.mark.parametrize(
    "args, key",
    [
        ({"length_coupling": 1.5}, "length_coupling"),
        ({"teacher_carry_error": -0.1}, "teacher_carry_error"),
        ({"min_operands": 4, "max_operands": 3}, "min_operands"),
        ({"max_operands": 7}, "max_operands"),
        ({"carry_error": 0.3}, "carry_error"),
    ],
)
def test_bad_task_args_are_config_errors_naming_the_key(args, key):
    with pytest.raises(ConfigError, match=f"task.args.*{key}"):
        build_task("chain", args)
