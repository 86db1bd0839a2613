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


# ----- the step verifier over given steps (step_credit.reward: task) --------------------------


def split(response: str) -> list[str]:
    """The pieces `step_credit.split: ";"` gives (rlpost/data/steps.py, which rewards may not
    import): each ';' ends a step, the rest is one more."""
    pieces = [p + ";" for p in response.split(";")]
    pieces[-1] = pieces[-1][:-1]
    return [p for p in pieces if p]


def test_score_steps_of_a_correct_response_in_either_style():
    task = Chain()
    assert split(SHORT) == ["a:27+5=32;", "b:32+8=40;", "c:40+9=49;", ">49"]
    for response in (SHORT, WORKED, "a:27+5=32~27+5=32~27+5=32;b:32+8:2+8=10,3+1=4:40;c:40+9=49;>49"):
        assert task.score_steps(P, split(response)) == [1.0, 1.0, 1.0, 1.0]
    # whitespace around a piece is ignored, as `score` strips the response
    assert task.score_steps(P, [" a:27+5=32;", "b:32+8=40;", "c:40+9=49;", ">49\n"]) == [1.0] * 4


def test_score_steps_marks_a_slip_and_carries_its_total_forward():
    task = Chain()
    slipped = "a:27+5=32;b:32+8=30;c:30+9=39;>39"
    assert task.score_steps(P, split(slipped)) == [1.0, 0.0, 1.0, 0.0]
    worked = "a:27+5:7+5=12,2+1=3:32;b:32+8:2+8=10,3+0=3:30;c:30+9:0+9=9,3+0=3:39;>39"
    assert task.score_steps(P, split(worked)) == [1.0, 0.0, 1.0, 0.0]
    # a step that does not start from the written total is wrong even if its sum is right
    # (the outcome reads only the end: the right sum scores 1)
    assert task.score_steps(P, split("a:27+5=32;b:32+8=30;c:40+9=49;>49")) == [1.0, 0.0, 0.0, 1.0]
    # the wrong operand, tags out of order, the first number miscopied
    assert task.score_steps(P, split("a:27+5=32;b:32+9=41;c:41+9=50;>50")) == [1.0, 0.0, 1.0, 0.0]
    assert task.score_steps(P, split("a:27+5=32;c:32+8=40;b:40+9=49;>49")) == [1.0, 0.0, 0.0, 0.0]
    assert task.score_steps(P, split("a:26+5=31;b:31+8=39;c:39+9=48;>48")) == [0.0, 1.0, 1.0, 0.0]
    # steps right, the answer not; a step too many
    assert task.score_steps(P, split("a:27+5=32;b:32+8=40;c:40+9=49;>48")) == [1.0, 1.0, 1.0, 0.0]
    assert task.score_steps(P, split("a:27+5=32;b:32+8=40;c:40+9=49;d:49+1=50;>50")) == [1, 1, 1, 0, 0]


def test_score_steps_of_a_give_up_and_of_rechecks():
    task = Chain()
    assert task.score_steps(P, split("a:27+5=32;b:32+8=30;>30")) == [1.0, 0.0, 0.0]
    rechecked = "a:27+5=32;b:32+8=30~32+8=30~32+8=30;c:30+9=39;>39"
    assert task.score_steps(P, split(rechecked)) == [1.0, 0.0, 1.0, 0.0]
    # a re-check that disagrees with its step makes the step inexact; the answer still counts
    odd = "a:27+5=32~27+5=33;b:32+8=40;c:40+9=49;>49"
    assert task.score_steps(P, split(odd)) == [0.0, 1.0, 1.0, 1.0]


def test_score_steps_of_garbage_pieces():
    task = Chain()
    assert task.score_steps(P, []) == []
    assert task.score_steps(P, [""]) == [0.0]
    assert task.score_steps(P, ["hello", ";", "49"]) == [0.0, 0.0, 0.0]
    # a piece holding several steps (the default newline split keeps a chain whole) is no step
    assert task.score_steps(P, [SHORT]) == [0.0]
    # garbage between steps is 0 and leaves the running total and the expected tag alone
    assert task.score_steps(P, ["a:27+5=32;", "xx;", "b:32+8=40;", "c:40+9=49;", ">49"]) == [1, 0, 1, 1, 0]
    # a final answer in the middle scores the whole response (which does not parse: 0)
    assert task.score_steps(P, ["a:27+5=32;", ">32", "b:32+8=40;"]) == [1.0, 0.0, 1.0]
    assert task.score_steps(P, ["a:27+5=32;", "b:32+8=40;", "c:40+9=49;", ">٤٩"]) == [1, 1, 1, 0]


def test_score_steps_agrees_with_step_scores_on_demonstrations():
    for seed in range(4):
        for coupling in (-0.5, 0.0, 0.5):
            task = Chain(teacher_carry_error=0.5, length_coupling=coupling)
            rng = random.Random(seed)
            for p in task.problems(60, seed=seed):
                d = task.demonstration(p, rng)
                pieces = split(d)
                scores = task.score_steps(p, pieces)
                assert len(scores) == len(pieces) and pieces[-1].startswith(">")
                present = len(pieces) - 1  # a give-up stops early: the steps it wrote
                assert scores[:-1] == task.step_scores(d, p)[:present]
                assert scores[-1] == task.score(d, p)


def test_the_task_base_has_no_step_verifier():
    from rlpost.rewards.base import Task

    with pytest.raises(NotImplementedError, match="no step verifier.*step_credit.reward"):
        Task().score_steps(P, ["x"])


# ----- step_scorer (rewards/steps.py) ---------------------------------------------------------


def halves(problem, steps):
    return [0.5] * len(steps)


def one_short(problem, steps):
    return [1.0] * (len(steps) - 1)


def with_nan(problem, steps):
    return [float("nan")] * len(steps)


def not_a_list(problem, steps):
    return 1.0


def test_step_scorer_of_the_task_and_of_a_function():
    import pickle

    from rlpost.rewards.steps import step_scorer
    from rlpost.rewards.tasks.arithmetic import Arithmetic

    scorer = step_scorer("task", Chain())
    assert scorer(P, split(SHORT)) == [1.0] * 4
    assert pickle.loads(pickle.dumps(scorer))(P, split(SHORT)) == [1.0] * 4  # for scoring workers
    assert step_scorer("tests.rewards.test_chain_task:halves", Chain())(P, ["x", "y"]) == [0.5, 0.5]
    with pytest.raises(ConfigError, match="key 'step_credit.reward': task Arithmetic has no step verifier"):
        step_scorer("task", Arithmetic())
    for bad in ("tests.rewards.no_such:fn", "tests.rewards.test_chain_task:missing", "halves"):
        with pytest.raises(ConfigError, match="key 'step_credit.reward'"):
            step_scorer(bad, Chain())


@pytest.mark.parametrize(
    "fn, message",
    [
        ("one_short", "returned 1 scores for 2 steps"),
        ("with_nan", "nan is not a finite float"),
        ("not_a_list", "returned float, not a list of floats"),
    ],
)
def test_step_scorer_checks_what_a_function_returns(fn, message):
    from rlpost.rewards.steps import step_scorer

    path = f"tests.rewards.test_chain_task:{fn}"
    long = Problem("9" * 100, "0", {})
    with pytest.raises(ValueError, match=f"step_credit.reward {path} on the problem '{'9' * 60}': {message}"):
        step_scorer(path, Chain())(long, ["x", "y"])
