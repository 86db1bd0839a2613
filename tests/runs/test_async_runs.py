"""Deterministic k-step-off (`rollout.staleness`): the same samples in-process, on Ray and
after a resume; each batch sampled with the weights of k steps before."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.run_helpers import read_metrics, run_train
from tests.runs.test_runs import assert_same_metrics


def busy_fractions(run_dir, worker: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[f"time/busy/{worker}"] for r in rows if r["step"] > 0]


def test_one_step_off_is_the_same_in_process_and_on_ray(tmp_path):
    local = read_metrics(run_train(tmp_path / "inprocess", "mode=inprocess", "rollout.staleness=1"))
    ray_run = run_train(tmp_path / "ray", "mode=ray", "rollout.staleness=1")
    on_ray = read_metrics(ray_run)
    # the engine generates batch t+1 within step t; nothing is sent after the last step
    rollout, learner = busy_fractions(ray_run, "rollout_0"), busy_fractions(ray_run, "learner_0")
    assert all(0 < b <= 1 for b in rollout[:3] + learner) and rollout[3] == 0, (rollout, learner)
    assert_same_metrics(local, on_ray, range(5))
    # batches 1 and 2 are sampled with the starting weights, batch t with step t-2's
    assert local[1]["staleness/lag_0_frac"] == 1.0 and local[1]["staleness/lag_max"] == 0
    for step in (2, 3, 4):
        assert local[step]["staleness/lag_1_frac"] == 1.0 and local[step]["staleness/lag_mean"] == 1
    # one step behind, the engines' log-probs are those of older weights than the learners'
    assert min(local[s]["logprob_gap/rollout_vs_learner_max"] for s in (2, 3, 4)) > 1e-4
    synchronous = read_metrics(run_train(tmp_path / "sync", "mode=inprocess"))
    assert synchronous[1]["reward/mean"] == local[1]["reward/mean"]  # the same first batch
    assert "staleness/lag_mean" not in synchronous[1]


@pytest.mark.slow
def test_two_steps_off_resumes_to_the_same_metrics(tmp_path):
    run = run_train(tmp_path / "full", "rollout.staleness=2", "steps=6", "save_every=2")
    full = read_metrics(run)
    step_2 = run / "checkpoints" / "step_2"
    assert (step_2 / "pending_rollouts.pt").is_file()  # batches 3 and 4 were sent ahead
    # the run as a kill right after its step-2 checkpoint leaves it
    killed = tmp_path / "killed" / run.name
    shutil.copytree(run, killed)
    for later in ("checkpoints/step_4", "checkpoints/step_6", "final_model"):
        shutil.rmtree(killed / later)
    resumed = run_train(tmp_path / "killed", f"resume={killed}")
    assert resumed == killed
    assert_same_metrics(full, read_metrics(killed), range(7))
