"""RewardPool: weighted components, per-sample failures and timeouts, local and on Ray.

The reward functions below are referenced by import path ("tests.rewards.test_rewards_pool:...")
as a user's would be; the scoring processes import this module to find them.
"""

from __future__ import annotations

import os
import time

import pytest

from rlpost.rewards import build_task
from rlpost.rewards.base import Problem
from rlpost.rewards.config import ComponentConfig, RewardConfig
from rlpost.rewards.scoring.pool import RewardPool


def length_or_raise(response: str, problem: Problem, limit: int = 5) -> float:
    if "bad" in response:
        raise ValueError(f"cannot score {response!r}")
    return float(min(len(response), limit))


def hang_on_request(response: str, problem: Problem) -> float:
    if response == "hang":
        while True:
            pass
    return 1.0


def die_on_request(response: str, problem: Problem) -> float:
    if response == "die":
        os._exit(3)
    return 1.0


def hog_on_request(response: str, problem: Problem) -> float:
    if response == "hog":
        return float(len(bytearray(8 << 30)))
    return 1.0


def user_component(function: str, **cfg) -> RewardConfig:
    return RewardConfig(components=[ComponentConfig(name="function", args={"path": function})], **cfg)


@pytest.fixture(scope="module")
def arithmetic():
    task = build_task("arithmetic", {"digits": 2})
    problems = task.problems(64, seed=0)
    # right, wrong, malformed (spaces, empty, junk), adversarial (a prompt echo, huge)
    kinds = [
        lambda p: p.answer,
        lambda p: str(int(p.answer) + 1),
        lambda p: f" {p.answer} ",
        lambda p: "",
        lambda p: "1+1=2",
        lambda p: p.prompt + p.answer,
        lambda p: p.answer * 10_000,
    ]
    responses = [kinds[i % len(kinds)](p) for i, p in enumerate(problems)]
    return task, problems, responses


def test_default_reproduces_the_task_score(arithmetic):
    task, problems, responses = arithmetic
    with RewardPool(RewardConfig(), task) as pool:
        result = pool.score(responses, problems)
    expected = [task.score(r, p) for r, p in zip(responses, problems)]
    assert result.totals == expected
    assert sum(expected) == 19  # the right (10) and padded-with-spaces (9) answers
    assert result.components == {"task": expected}
    assert result.failures == {"raised": 0, "timed_out": 0} and result.example is None
    assert result.metrics() == {
        "reward/task": 19 / 64,
        "reward/failures/raised": 0.0,
        "reward/failures/timed_out": 0.0,
    }


def test_weighted_components_and_lengths(arithmetic):
    task, problems, _ = arithmetic
    p = problems[0]
    responses = [f"<think>ok</think><answer>{p.answer}</answer>", p.answer, "<answer>1</answer>"]
    cfg = RewardConfig(
        num_workers=1,
        components=[
            ComponentConfig(name="task", weight=1.0),
            ComponentConfig(name="format", weight=0.5),
            ComponentConfig(name="length", weight=0.25, args={"target": 10, "tolerance": 20}),
            ComponentConfig(name="overlong", weight=1.0, args={"max_length": 30, "buffer": 10}),
        ],
    )
    lengths = [40, 10, 25]  # as the trainer passes token counts
    with RewardPool(cfg, task) as pool:
        result = pool.score(responses, [p] * 3, lengths)
    assert result.components == {
        "task": [0.0, 1.0, 0.0],
        "format": [1.0, 0.0, 0.0],
        "length": [-1.0, 0.0, -0.75],
        "overlong": [-1.0, 0.0, -0.5],
    }
    assert result.totals == pytest.approx([0.5 - 0.25 - 1.0, 1.0, -0.1875 - 0.5])


def test_raising_reward_scores_zero_and_is_counted(arithmetic):
    task, problems, _ = arithmetic
    responses = ["abc", "bad one", "abcdefgh", "", "also bad"] * 4
    cfg = RewardConfig(
        components=[
            ComponentConfig(name="task"),
            ComponentConfig(
                name="function",
                label="len",
                weight=2.0,
                args={"path": "tests.rewards.test_rewards_pool:length_or_raise"},
            ),
        ]
    )
    with RewardPool(cfg, task) as pool:
        result = pool.score(responses, problems[:20])
    assert result.components["len"] == [3.0, 0.0, 5.0, 0.0, 0.0] * 4
    assert result.totals == [6.0, 0.0, 10.0, 0.0, 0.0] * 4
    assert result.failures == {"raised": 8, "timed_out": 0}
    assert result.example.startswith("len: ValueError: cannot score 'bad one'")
    assert result.example.endswith("response: 'bad one'")


def test_reward_that_never_returns_times_out_and_the_pool_goes_on(arithmetic):
    task, problems, _ = arithmetic
    responses = ["a", "hang", "b", "c", "hang", "d"]
    with RewardPool(
        user_component("tests.rewards.test_rewards_pool:hang_on_request", num_workers=1, timeout_s=1.0), task
    ) as pool:
        t = time.monotonic()
        result = pool.score(responses, problems[:6])
        elapsed = time.monotonic() - t
        assert result.totals == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
        assert result.failures == {"raised": 0, "timed_out": 2}
        assert result.example == "function: timed out after 1.0s | response: 'hang'"
        # two timeouts of 1 s, each followed by a fresh process (~0.5 s here)
        assert elapsed < 2 * 1.0 + 4
        assert result.replaced == 2 and 2.0 <= result.time_lost_s <= elapsed
        again = pool.score(["e", "f"], problems[:2])
        assert again.totals == [1.0, 1.0] and again.failures == {"raised": 0, "timed_out": 0}


def test_reward_that_kills_its_process_is_counted(arithmetic):
    task, problems, _ = arithmetic
    with RewardPool(
        user_component("tests.rewards.test_rewards_pool:die_on_request", num_workers=1), task
    ) as pool:
        result = pool.score(["a", "die", "b"], problems[:3])
    assert result.totals == [1.0, 0.0, 1.0]
    assert result.failures == {"raised": 1, "timed_out": 0} and result.causes == {"exit": 1}
    assert result.example.startswith("function: reward worker died (exit code 3)")


def test_reward_memory_is_limited(arithmetic):
    task, problems, _ = arithmetic
    with RewardPool(
        user_component("tests.rewards.test_rewards_pool:hog_on_request", num_workers=1, memory_mb=2048), task
    ) as pool:
        result = pool.score(["hog", "a"], problems[:2])
    assert result.totals == [0.0, 1.0] and result.failures["raised"] == 1
    assert result.causes == {"memory": 1}
    assert result.example.startswith("function: MemoryError")


def test_code_reward_through_the_pool(arithmetic):
    task, _, _ = arithmetic
    problem = Problem("", "", {"tests": [{"input": "2 3", "output": "5"}]})
    responses = [
        "print(sum(map(int, input().split())))",
        "print(6)",
        "import os\nos.kill(os.getppid(), 9)\nprint(5)",  # its parent is not ours
        "while True: pass",
    ]
    cfg = RewardConfig(
        num_workers=2,
        timeout_s=5.0,
        components=[ComponentConfig(name="code", args={"cpu_s": 1, "wall_s": 2.0})],
    )
    with RewardPool(cfg, task) as pool:
        result = pool.score(responses, [problem] * 4)
        assert result.totals == [1.0, 0.0, 1.0, 0.0]
        assert result.failures == {"raised": 0, "timed_out": 0}  # the sandbox's limits did it
        assert pool.score(responses[:1], [problem]).totals == [1.0]


def test_empty_batch(arithmetic):
    task, _, _ = arithmetic
    with RewardPool(RewardConfig(num_workers=1), task) as pool:
        result = pool.score([], [])
    assert result.totals == [] and result.components == {"task": []}


@pytest.mark.slow
def test_ray_pool_matches_local_and_times_out(arithmetic):
    import ray

    task, problems, responses = arithmetic
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        cfg = RewardConfig(
            timeout_s=1.0,
            components=[
                ComponentConfig(name="task"),
                ComponentConfig(
                    name="function",
                    label="hang",
                    args={"path": "tests.rewards.test_rewards_pool:hang_on_request"},
                ),
            ],
        )
        with RewardPool(cfg, task, use_ray=True) as pool:
            result = pool.score(responses, problems)
            assert result.components["task"] == [task.score(r, p) for r, p in zip(responses, problems)]
            t = time.monotonic()
            hung = pool.score(["hang", "x"], problems[:2])
            assert time.monotonic() - t < 1.0 + 6
            assert hung.components["hang"] == [0.0, 1.0]
            assert hung.failures == {"raised": 0, "timed_out": 1}
            assert pool.score(["x"], problems[:1]).totals == [1.0 + task.score("x", problems[0])]
    finally:
        ray.shutdown()


def test_a_component_that_cannot_start_fails_the_pool_loudly(arithmetic):
    import multiprocessing

    task, _, _ = arithmetic
    unchecked = ComponentConfig.model_construct(
        name="function", weight=1.0, label=None, args={"path": "no_such_module:f"}
    )
    with pytest.raises(RuntimeError, match="(?s)reward worker failed to start: .*no_such_module"):
        RewardPool(
            RewardConfig.model_construct(components=[unchecked], num_workers=2, timeout_s=5.0, memory_mb=0),
            task,
        )
    assert multiprocessing.active_children() == []
