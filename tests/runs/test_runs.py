"""Whole training jobs through the CLI: in-process vs Ray, checkpoint resume, run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.run_helpers import ROOT, only_run_dir, read_metrics, run_train, train_cmd


def assert_same_metrics(a: dict, b: dict, steps):
    for step in steps:
        assert set(a[step]) == set(b[step]), step
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)


def assert_step_time_adds_up(run_dir, one_call: bool = False):
    """The workers' compute fits in the controller's wall time of its phase (nothing
    from evaluation leaks into the next step), and compute, reward, weight sync and
    framework overhead make up the step. `one_call`: the learners scored and trained in
    one call, timed as the update phase."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in (r for r in rows if r["step"] > 0):
        compute = {name: row[f"time/compute/{name}"] for name in ("generate", "logprob", "update")}
        assert 0 < compute["generate"] <= row["time/rollout"], row["step"]
        assert ("time/logprob" not in row) == one_call, row["step"]
        if one_call:
            assert 0 < compute["logprob"] and 0 < compute["update"], row["step"]
            assert compute["logprob"] + compute["update"] <= row["time/update"], row["step"]
        else:
            assert 0 < compute["logprob"] <= row["time/logprob"], row["step"]
            assert 0 < compute["update"] <= row["time/update"], row["step"]
        overhead = row["time/framework_overhead"]
        parts = sum(compute.values()) + row["time/reward"] + row["time/weight_sync"] + overhead
        assert parts == pytest.approx(row["time/step"]) and overhead >= 0
        assert row["time/framework_overhead_frac"] == pytest.approx(overhead / row["time/step"])


@pytest.mark.parametrize("epochs", [2, 1])  # 1: each learner call scores and trains
def test_inprocess_and_ray_give_the_same_metrics(tmp_path, epochs):
    local = run_train(tmp_path / "inprocess", "mode=inprocess", f"learner.epochs={epochs}")
    on_ray = run_train(tmp_path / "ray", "mode=ray", f"learner.epochs={epochs}")
    a, b = read_metrics(local), read_metrics(on_ray)
    assert sorted(a) == [0, 1, 2, 3, 4]
    assert any(a[s]["loss"] != 0 for s in range(1, 5)) and "clip_frac_low" in a[4]
    assert "eval/accuracy_greedy" in a[2]
    # the engine samples with the weights the learner holds after each sync
    assert max(a[s]["logprob_gap/rollout_vs_learner_max"] for s in range(1, 5)) < 1e-4
    assert_same_metrics(a, b, range(5))
    assert_step_time_adds_up(local, one_call=epochs == 1)
    assert_step_time_adds_up(on_ray, one_call=epochs == 1)


def test_run_directory_contents(tmp_path):
    run = run_train(tmp_path, "steps=2", "save_every=1")
    assert (run / "config.yaml").is_file()
    assert (run / "plots" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "final_model" / "config.json").is_file()
    for step in (1, 2):
        state = json.loads((run / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())
        assert state["step"] == step and state["data_position"] == step * 4


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    full = read_metrics(run_train(tmp_path / "full", "steps=6", "save_every=2"))

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(out, "steps=6", "save_every=2"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(out.glob("*/checkpoints/step_2/trainer_state.json")):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    run = only_run_dir(out)
    assert not (run / "final_model").exists()

    resumed = run_train(out, f"resume={run}")
    assert resumed == run
    got = read_metrics(run)
    assert sorted(got) == sorted(full)
    assert_same_metrics(full, got, range(7))


def test_hapo_trains_in_process(tmp_path):
    run = run_train(tmp_path, "algorithm.name=hapo", "algorithm.tau=0.5", "steps=3", "eval_every=0")
    metrics = read_metrics(run)
    for step in (1, 2, 3):
        m = metrics[step]
        assert -1.0 <= m["h_hat"] <= 1.0 and 0.0 <= m["neutral_frac"] <= 1.0
        assert m["agg/positive_side_weight"] + m["agg/negative_side_weight"] <= 1.0 + 1e-9
        # the learner scores each token at the temperature the engine drew it at
        assert m["logprob_gap/rollout_vs_learner_max"] < 1e-5
    # adaptive temperature: plain T (1.0) on the first step, T (1 + tau h_hat) after
    assert "sampling/temperature_mean" not in metrics[1]
    for step in (2, 3):
        m = metrics[step]
        assert 0.5 <= m["sampling/temperature_min"] < 1.0 < m["sampling/temperature_max"] <= 1.5
    state = json.loads((run / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["sampling_rule"]["tau"] == 0.5 and state["sampling_rule"]["stats"]["s"] > 0


def test_tw_grpo_trains_in_process(tmp_path):
    metrics = read_metrics(run_train(tmp_path, "algorithm.tw_alpha=1.7", "steps=2", "eval_every=0"))
    for step in (1, 2):
        # every response starts at a position all rollouts of its group agree on (w = 1),
        # so the mean lies strictly inside [1, alpha]
        assert 1.0 < metrics[step]["selection/position_weight_mean"] < 1.7


def test_a_reward_that_raises_scores_zero_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # where reward_fixtures lives
    proc = subprocess.run(
        train_cmd(
            tmp_path,
            "steps=2",
            "eval_every=0",
            "reward.components=[{name: task}, {name: function, weight: 0.5, "
            "args: {path: 'reward_fixtures:fails_on_odd_length'}}]",
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(only_run_dir(tmp_path))
    for step in (1, 2):
        m = metrics[step]
        raised = m["reward/failures/raised"]
        # every odd-length response raised and scored 0, every even one scored 1
        assert 0 < raised < 16 and m["reward/function"] == pytest.approx(1 - raised / 16)
        assert m["reward/failures/timed_out"] == 0
        # the reward is the task score plus half the function's value
        assert m["reward/mean"] == pytest.approx(m["reward/task"] + 0.5 * m["reward/function"])
    assert "ValueError: odd length" in proc.stdout
