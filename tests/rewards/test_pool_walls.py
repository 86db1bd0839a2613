"""RewardPool against reward functions that attack their own scoring process.

Each hostile reward (tests/rewards/hostile_rewards.py) is a user's `function` reward
(unsandboxed by design). The pool's promise: such a call costs the samples it touched
(scored 0, counted by kind), the worker is replaced, innocent samples in the same
batch score right, the next batch is scored on time, and no batch outlives
`reward.batch_timeout_s`. Time bounds are in timeouts and worker starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, ValidationError

from rlpost.config.load import _format_error
from rlpost.rewards import build_task
from rlpost.rewards.base import Problem
from rlpost.rewards.config import ComponentConfig, RewardConfig
from rlpost.rewards.scoring.pool import RewardPool, RewardResult
from rlpost.rewards.scoring.process import LOG_BYTES

# A replacement worker's start: ~0.2 s on the idle 2-core machine, up to ~2 s when other
# jobs load it. Time bounds below are in timeouts and starts: what each case may cost.
START_S = 3.0


class WithReward(BaseModel):
    """The reward section as TrainConfig holds it."""

    reward: RewardConfig = Field(default_factory=RewardConfig)


def user_pool(task, use_ray: bool = False, **cfg) -> RewardPool:
    component = ComponentConfig(name="function", args={"path": "tests.rewards.hostile_rewards:hostile"})
    return RewardPool(RewardConfig(components=[component], **cfg), task, use_ray)


def timed(pool: RewardPool, responses: list[str], problems) -> tuple[RewardResult, float]:
    t = time.monotonic()
    result = pool.score(responses, problems[: len(responses)])
    return result, time.monotonic() - t


def next_batch_on_time(pool: RewardPool, problems, n: int = 8, within: float = START_S) -> None:
    """The batch after: every sample scores, nothing fails, no worker is replaced (one
    still starting after the last batch's kill may cost it its start)."""
    result, elapsed = timed(pool, ["ok"] * n, problems)
    assert result.totals == [1.0] * n and result.failures == {"raised": 0, "timed_out": 0}
    assert result.causes == {} and result.replaced == 0
    assert elapsed < within, elapsed


@pytest.fixture(scope="module")
def task():
    return build_task("arithmetic", {"digits": 2})


@pytest.fixture(scope="module")
def problems(task):
    return task.problems(64, seed=0)


def test_closing_and_flooding_stdio_cost_only_the_calls_that_broke_their_own_output(task, problems, capfd):
    responses = ["ok", "close_fds", "ok", "close_streams", "ok", "swap_fds", "ok", "flood", "ok"]
    with user_pool(task, num_workers=1, timeout_s=2.0) as pool:
        result, elapsed = timed(pool, responses, problems)
        # close_*: the call then prints into what it closed and raises; swap_fds prints into
        # its own /dev/null; the flood (16 MiB) is drained; every later call prints as usual
        assert result.totals == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
        assert result.failures == {"raised": 2, "timed_out": 0} and result.causes == {}
        assert result.replaced == 0 and result.time_lost_s == 0.0  # no process was lost
        assert result.example.startswith("function: OSError: [Errno 9] Bad file descriptor")
        assert elapsed < 1.0, elapsed
        next_batch_on_time(pool, problems)
    time.sleep(0.2)  # the output thread forwards what the workers wrote
    out, err = capfd.readouterr()
    assert "scoring" in err and "a note" in err  # a reward's prints reach the run's stderr...
    assert len(err) < 4 * LOG_BYTES and "over the limit dropped" in err  # ...bounded


FLOOD_BEHIND_A_STUCK_PIPE = """
import json, sys, time
from rlpost.rewards import build_task
from tests.rewards.test_pool_walls import user_pool
if __name__ == "__main__":
    task = build_task("arithmetic", {"digits": 2})
    problems = task.problems(8, seed=0)
    with user_pool(task, num_workers=2, timeout_s=20.0) as pool:
        t = time.monotonic()
        totals = [pool.score(["flood", "ok"] * 4, problems).totals for _ in range(2)]
        json.dump({"totals": totals, "elapsed": time.monotonic() - t}, open(sys.argv[1], "w"))
"""


def test_a_flood_behind_a_stdout_nobody_reads_does_not_block(tmp_path):
    """The run's own stdout and stderr are pipes that nobody reads (a launcher that
    collects them at the end): before, the first flood blocked its worker until the
    timeout, and every later print too."""
    out = tmp_path / "result.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOD_BEHIND_A_STUCK_PIPE, str(out)],
        cwd=Path(__file__).parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    result = json.loads(out.read_text())
    assert result["totals"] == [[1.0] * 8] * 2  # no call timed out
    assert result["elapsed"] < 10.0, result


def test_exit_and_crash_cost_their_own_sample(task, problems):
    responses = ["ok", "exit", "ok", "os_exit", "ok", "segfault", "ok"]
    with user_pool(task, num_workers=1, timeout_s=2.0) as pool:
        result, elapsed = timed(pool, responses, problems)
        assert result.totals == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
        assert result.failures == {"raised": 3, "timed_out": 0}
        assert result.causes == {"exit": 2, "crash": 1}
        assert result.example.startswith("function: SystemExit: 3")
        assert result.replaced == 2  # sys.exit is caught: only os._exit and the segfault end it
        assert elapsed < 2 * START_S, elapsed  # two replacements
        metrics = result.metrics()
        assert metrics["reward/failures/exit"] == 2.0 and metrics["reward/failures/crash"] == 1.0
        died, _ = timed(pool, ["segfault"], problems)
        assert died.example == "function: reward worker died (SIGSEGV) | response: 'segfault'"
        next_batch_on_time(pool, problems)


def test_hangs_that_hold_the_gil_time_out_on_the_pools_clock(task, problems):
    responses = ["ok", "gil_sleep", "ok", "regex", "ok"]
    with user_pool(task, num_workers=1, timeout_s=1.0) as pool:
        result, elapsed = timed(pool, responses, problems)
        assert result.totals == [1.0, 0.0, 1.0, 0.0, 1.0]
        assert result.failures == {"raised": 0, "timed_out": 2} and result.causes == {}
        assert result.replaced == 2
        assert 2.0 <= result.time_lost_s <= elapsed  # two timeouts and the replacements' starts
        assert elapsed < 2 * (1.0 + START_S), elapsed
        next_batch_on_time(pool, problems)


def test_memory_that_leaks_costs_only_the_leaking_call(task, problems):
    # leak: without bound in one call (MemoryError at the limit); leak_some: 256 MiB more
    # per call, kept: the worker retires past its mark, before an innocent call fails
    responses = ["ok", "leak", "ok"] + ["leak_some", "ok"] * 4
    with user_pool(task, num_workers=1, timeout_s=5.0, memory_mb=1024) as pool:
        result, elapsed = timed(pool, responses, problems)
        assert result.totals == [1.0, 0.0] + [1.0] * 9
        assert result.failures == {"raised": 1, "timed_out": 0} and result.causes == {"memory": 1}
        assert result.example.startswith("function: MemoryError")
        assert result.replaced >= 2  # after the MemoryError, and after the leaks passed the mark
        assert elapsed < result.replaced * START_S + 1.0, elapsed
        # a thread of the reward's own fills the address space after its call returned: the
        # worker is replaced before the next chunk, which would fail to allocate there
        bloated, _ = timed(pool, ["bloat_later"], problems)
        assert bloated.totals == [1.0]
        time.sleep(1.0)
        result, elapsed = timed(pool, ["ok"] * 4, problems)
        assert result.totals == [1.0] * 4 and result.failures == {"raised": 0, "timed_out": 0}
        assert result.replaced == 1 and elapsed < START_S
        next_batch_on_time(pool, problems)


def processes_with(marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,ppid,pgid,args"], capture_output=True, text=True, check=True)
    return [line for line in ps.stdout.splitlines() if marker in line]


def test_a_timed_out_reward_leaves_no_process_behind(task, problems, tmp_path):
    marker = f"0.{os.getpid()}{time.monotonic_ns() % 10**6}"
    flag = tmp_path / "spawned"
    with user_pool(task, num_workers=1, timeout_s=1.0) as pool:
        result, elapsed = timed(pool, [f"orphan:{marker}:{flag}", "ok"], problems)
        assert flag.exists()  # its child, its new-session child and its daemon had started
        assert result.totals == [0.0, 1.0] and result.failures == {"raised": 0, "timed_out": 1}
        assert elapsed < 1.0 + START_S, elapsed
        for _ in range(20):  # SIGKILL is delivered at once; the exits are seen within ms
            if not processes_with(marker):
                break
            time.sleep(0.05)
        assert processes_with(marker) == []
        next_batch_on_time(pool, problems)


def test_a_worker_that_dies_between_calls_costs_nothing(task, problems):
    with user_pool(task, num_workers=1, timeout_s=2.0) as pool:
        first, _ = timed(pool, ["die_later", "ok"], problems)
        assert first.totals == [1.0, 1.0]
        time.sleep(0.5)  # it dies 0.2 s after its call, between batches
        result, elapsed = timed(pool, ["ok"] * 4, problems)
        assert result.totals == [1.0] * 4 and result.failures == {"raised": 0, "timed_out": 0}
        assert result.replaced == 1 and elapsed < START_S
        next_batch_on_time(pool, problems)


def test_a_worker_stuck_between_calls_is_replaced(task, problems):
    """A thread of the reward's own holds the GIL after its call returned: the worker
    never picks up the next chunk. The pool sees no call start within timeout_s, kills
    it and sends the chunk to a fresh one."""
    with user_pool(task, num_workers=1, timeout_s=1.0) as pool:
        first, _ = timed(pool, ["stall_later"], problems)
        assert first.totals == [1.0]
        time.sleep(0.3)
        result, elapsed = timed(pool, ["ok"] * 4, problems)
        assert result.totals == [1.0] * 4 and result.failures == {"raised": 0, "timed_out": 0}
        assert result.replaced == 1 and elapsed < 1.0 + START_S
        next_batch_on_time(pool, problems)


def test_hangs_do_not_queue_past_the_batch_deadline(task, problems):
    """16 one-second hangs on 2 workers took 10.8 s, one after another (before this
    change, and now with batch_timeout_s: 0); the batch deadline bounds them."""
    responses = ["ok"] * 4 + ["hang"] * 16
    with user_pool(task, num_workers=2, timeout_s=1.0, batch_timeout_s=2.0) as pool:
        result, elapsed = timed(pool, responses, problems)
        # the deadline, then the kill of the workers still at it (and the launch of their
        # replacements, not their start): ~0.05 s here, up to ~0.5 s under load
        assert elapsed < 2.0 + 1.0, elapsed
        assert result.totals == [1.0] * 4 + [0.0] * 16
        assert result.failures == {"raised": 0, "timed_out": 16}
        # each worker had one natural timeout at 1 s (two if its restart was quick); the
        # rest was cut
        assert 12 <= result.causes["deadline"] <= 14
        assert result.example == "function: timed out after 1.0s | response: 'hang'"
        # worker-seconds on killed calls and on waiting for replacements: ~2 per worker
        assert 2.0 <= result.time_lost_s <= 2 * elapsed
        metrics = result.metrics()
        assert metrics["reward/failures/deadline"] == result.causes["deadline"]
        assert metrics["reward/time_lost_s"] == result.time_lost_s
        next_batch_on_time(pool, problems)


def test_batch_timeout_config():
    assert RewardConfig().batch_deadline_s() == 120.0  # 6 x 10 s, at least 120 s
    assert RewardConfig(timeout_s=30).batch_deadline_s() == 180.0
    assert RewardConfig(batch_timeout_s=0).batch_deadline_s() is None
    assert RewardConfig(timeout_s=5, batch_timeout_s=5).batch_deadline_s() == 5.0
    with pytest.raises(ValidationError) as info:
        WithReward.model_validate({"reward": {"timeout_s": 10, "batch_timeout_s": 5}})
    message = _format_error("run.yaml", info.value)
    assert message == (
        "run.yaml: key 'reward': reward.batch_timeout_s (5.0) must be at least reward.timeout_s "
        "(10.0), what one sample may take, or 0 for no limit"
    )
    with pytest.raises(ValidationError) as info:
        WithReward.model_validate({"reward": {"batch_timeout_s": -1}})
    assert _format_error("run.yaml", info.value).startswith("run.yaml: key 'reward.batch_timeout_s': ")


MATH_ADVERSARIAL = [
    r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",  # deep nesting
    r"\boxed{9^{9^{9^{9^{9}}}}}",  # a huge power
    r"\boxed{100000!}",  # a huge factorial
    r"\boxed{(10^{10})!!}",
    r"\boxed{" + "7" * (1 << 20) + "}",  # a megabyte number
    "blah " * 200_000 + r"\boxed{3}",  # a megabyte of text
    "\\" * (1 << 20),  # a megabyte of backslashes
]


def test_math_verify_on_adversarial_answers_is_contained():
    right = r"so \boxed{\frac{1}{2}}"
    responses = [right, *MATH_ADVERSARIAL, right]
    problem = Problem("", r"\frac{1}{2}")
    cfg = RewardConfig(
        components=[ComponentConfig(name="math")], num_workers=2, timeout_s=1.0, memory_mb=2048
    )
    with RewardPool(cfg, task=None) as pool:
        t = time.monotonic()
        result = pool.score(responses, [problem] * len(responses))
        elapsed = time.monotonic() - t
        assert result.totals == [1.0] + [0.0] * len(MATH_ADVERSARIAL) + [1.0]
        # those math-verify cannot finish time out (4 here); none takes the pool with it
        assert sum(result.failures.values()) <= len(MATH_ADVERSARIAL)
        assert elapsed < len(MATH_ADVERSARIAL) * (1.0 + START_S) / 2, elapsed
        t = time.monotonic()
        again = pool.score([right] * 4, [problem] * 4)
        assert again.totals == [1.0] * 4 and time.monotonic() - t < START_S


@pytest.mark.slow
def test_ray_pool_holds_the_same_walls(task, problems):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with user_pool(task, num_workers=2, timeout_s=1.0, batch_timeout_s=3.0, use_ray=True) as pool:
            result, elapsed = timed(pool, ["ok", "segfault", "close_fds", "ok", "gil_sleep", "ok"], problems)
            assert result.totals == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
            assert result.failures == {"raised": 2, "timed_out": 1} and result.causes == {"crash": 1}
            assert elapsed < 1.0 + 3.0, elapsed
            result, elapsed = timed(pool, ["hang"] * 12, problems)
            assert result.failures == {"raised": 0, "timed_out": 12} and result.causes["deadline"] >= 6
            assert elapsed < 3.0 + 2.0, elapsed
            # an actor that dies between calls is replaced and its chunk sent again
            ray.kill(pool.scorers[0].actor)
            result, _ = timed(pool, ["ok"] * 8, problems)
            assert result.totals == [1.0] * 8 and result.failures == {"raised": 0, "timed_out": 0}
            assert result.replaced == 1
            next_batch_on_time(pool, problems)
    finally:
        ray.shutdown()
