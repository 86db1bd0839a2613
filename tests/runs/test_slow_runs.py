"""Slow tier: the quickstart job as a user runs it, and the real vLLM engine in the RL loop."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.run_helpers import ROOT, read_metrics, run_train, train_cmd

pytestmark = pytest.mark.slow


def test_quickstart_rl_beats_warmup(tmp_path):
    proc = subprocess.run(
        train_cmd(tmp_path, config=ROOT / "configs" / "quickstart.yaml"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = float(re.search(r"accuracy after warm-up \(before RL\): ([\d.]+)", proc.stdout)[1])
    after = float(re.search(r"accuracy after RL:\s+([\d.]+)", proc.stdout)[1])
    assert after - before >= 0.25, proc.stdout[-3000:]


def test_vllm_engine_in_the_rl_loop(tmp_path):
    # HAPO with a large tau: from step 2 on, vLLM samples every token at its own T_t
    run = run_train(
        tmp_path,
        "mode=ray",
        "rollout.engine=vllm",
        "model.hidden_size=128",
        "algorithm.name=hapo",
        "algorithm.tau=0.5",
    )
    metrics = read_metrics(run)
    assert sorted(metrics) == [0, 1, 2, 3, 4]
    # before the first update the learner holds the engine's weights: same log-probs
    assert metrics[1]["logprob_gap/rollout_vs_learner_max"] < 1e-4
    # after each update the synced engine must still agree with the learner, also on
    # the per-token temperature both derive from the previous batch's statistics
    for step in (2, 3, 4):
        assert metrics[step]["logprob_gap/rollout_vs_learner_max"] < 1e-4
        assert metrics[step]["sampling/temperature_min"] < 1.0 < metrics[step]["sampling/temperature_max"]
