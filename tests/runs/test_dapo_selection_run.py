"""One short in-process run with dynamic sampling, overlong shaping, truncation masking,
D3S and balanced aggregation; then a resume from its middle checkpoint, which must
repeat the last step exactly (the prompt stream position is part of the checkpoint)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.run_helpers import read_metrics, run_train

OVERRIDES = (
    "steps=3",
    "save_every=2",
    "eval_every=0",
    "rollout.dynamic_sampling=true",
    "rollout.max_extra_rounds=2",
    "rollout.overlong_buffer=1",
    "rollout.mask_truncated=true",
    "algorithm.selection=d3s",
    "algorithm.d3s.schedule_steps=2",
    "algorithm.loss_agg=balanced",
)


def test_dapo_and_d3s_run_and_resume_exactly(tmp_path):
    run = run_train(tmp_path / "full", *OVERRIDES)
    full = read_metrics(run)
    position = 0
    for step in (1, 2, 3):
        m = full[step]
        assert 0 <= m["dynamic_sampling/dropped_group_frac"] <= 1
        assert 1 <= m["dynamic_sampling/kept_groups"] <= 4
        assert -1 <= m["overlong/penalty_mean"] <= 0
        assert 0 < m["selection/token_frac"] <= 1
        position += 4 * (1 + m["dynamic_sampling/extra_rounds"])
        if step == 2:
            state = json.loads((run / "checkpoints" / "step_2" / "trainer_state.json").read_text())
            assert state["data_position"] == position
    # D3S at step 1: N = 0.5 * 4 of every group; by step 3 the schedule has reached 1
    assert full[1]["selection/sample_frac"] == 0.5
    assert full[3]["selection/sample_frac"] == 1.0

    copy = tmp_path / "resumed" / run.name
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_3")
    shutil.rmtree(copy / "final_model")
    run_train(tmp_path / "resumed", f"resume={copy}")
    resumed = read_metrics(copy)
    assert sorted(resumed) == sorted(full)
    for key, value in full[3].items():
        assert resumed[3][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
