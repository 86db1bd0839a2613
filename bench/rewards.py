"""Reward scoring throughput: the math and code rewards over a batch, in parallel and serially.

    python bench/rewards.py                  # 1024 samples, one worker per CPU core
    python bench/rewards.py --workers 8 --samples 2048

For each reward, a RewardPool with --workers scoring processes and one with a
single process (the serial baseline) score the same batch in this run: the
start-up of the pool (processes up, components built) and the samples/s of one
warm `score` call over the whole batch, then the ratio. Also the per-call cost
of the default reward (the task's own score) on a quickstart-sized batch (256
arithmetic samples, 2 workers) against calling the task's score inline.

math: gold answers are LaTeX fractions; the responses give them as \\boxed{},
"the answer is" decimals, a/b after <answer> tags, or a wrong one.
code: "print the sum of the integers on stdin", one stdin/stdout test each;
right, wrong and crashing programs (no looping ones: each would add its CPU limit).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from rlpost.rewards import build_task
from rlpost.rewards.base import Problem
from rlpost.rewards.config import ComponentConfig, RewardConfig
from rlpost.rewards.scoring.pool import RewardPool


def math_batch(n: int, rng: random.Random) -> tuple[list[str], list[Problem]]:
    responses, problems = [], []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(2, 99)
        problems.append(Problem(f"{a}/{b}?", f"\\frac{{{a}}}{{{b}}}"))
        responses.append(
            [
                f"Reducing gives \\boxed{{\\frac{{{a}}}{{{b}}}}}.",
                f"The answer is {a / b:.6f}",
                f"<think>divide</think><answer>{a}/{b}</answer>",
                f"So we get \\boxed{{\\frac{{{a + 1}}}{{{b}}}}}",
            ][i % 4]
        )
    return responses, problems


def code_batch(n: int, rng: random.Random) -> tuple[list[str], list[Problem]]:
    programs = [
        "import sys\nprint(sum(map(int, sys.stdin.read().split())))",
        "import sys\nprint(max(map(int, sys.stdin.read().split())))",
        "print(undefined)",
    ]
    responses, problems = [], []
    for i in range(n):
        numbers = [rng.randint(-99, 99) for _ in range(5)]
        test = {"input": " ".join(map(str, numbers)), "output": str(sum(numbers))}
        problems.append(Problem("sum", "", {"tests": [test]}))
        responses.append(f"```python\n{programs[i % 3]}\n```")
    return responses, problems


def measure(component: ComponentConfig, workers: int, responses, problems) -> dict:
    cfg = RewardConfig(components=[component], num_workers=workers, timeout_s=5.0)
    t = time.perf_counter()
    with RewardPool(cfg, task=None) as pool:
        start = time.perf_counter() - t
        pool.score(responses[:workers], problems[:workers])  # each worker's first call
        t = time.perf_counter()
        result = pool.score(responses, problems)
        elapsed = time.perf_counter() - t
    return {
        "start": start,
        "rate": len(responses) / elapsed,
        "totals": result.totals,
        "failures": result.failures,
    }


def quickstart_overhead() -> str:
    task = build_task("arithmetic", {"digits": 2})
    problems = task.problems(256, seed=0)
    responses = [p.answer if i % 3 else "12" for i, p in enumerate(problems)]
    t = time.perf_counter()
    with RewardPool(RewardConfig(num_workers=2), task) as pool:
        start = time.perf_counter() - t
        calls = []
        for _ in range(30):
            t = time.perf_counter()
            pool.score(responses, problems)
            calls.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(30):
        [task.score(r, p) for r, p in zip(responses, problems)]
    inline = (time.perf_counter() - t) / 30
    return (
        f"default reward (task score), 256 arithmetic samples, 2 workers: start "
        f"{start:.2f} s; per call {statistics.median(calls[5:]) * 1e3:.2f} ms (median) "
        f"against {inline * 1e3:.2f} ms inline"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    rng = random.Random(0)
    rows = []
    for name, batch, component in (
        ("math", math_batch, ComponentConfig(name="math")),
        ("code", code_batch, ComponentConfig(name="code", args={"cpu_s": 1, "wall_s": 3.0})),
    ):
        responses, problems = batch(args.samples, rng)
        parallel = measure(component, args.workers, responses, problems)
        serial = measure(component, 1, responses, problems)
        assert parallel["totals"] == serial["totals"], "parallel and serial scores differ"
        mean = sum(serial["totals"]) / len(serial["totals"])
        rows.append(
            f"{name:5} {args.samples:>7} {mean:>10.3f} "
            f"{serial['start']:>8.2f} s {serial['rate']:>9.1f} "
            f"{parallel['start']:>8.2f} s {parallel['rate']:>9.1f} "
            f"{parallel['rate'] / serial['rate']:>7.2f}x  {parallel['failures']}"
        )
    print(
        f"{'':5} {'samples':>7} {'mean score':>10} {'1 worker: start, samples/s':>27} "
        f"{f'{args.workers} workers: start, samples/s':>28} {'ratio':>8}  failures"
    )
    print("\n".join(rows))
    print(quickstart_overhead())


if __name__ == "__main__":
    main()
