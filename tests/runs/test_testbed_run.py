"""configs/testbed/chain.yaml runs end to end (a few steps of it) and logs the length
metrics its sweeps report."""

import pytest

from tests.run_helpers import ROOT, read_metrics, run_train

TESTBED = ROOT / "configs" / "testbed" / "chain.yaml"


@pytest.mark.slow  # about 40 s: 224-token responses from a barely trained model
def test_the_testbed_config_trains_and_logs_lengths_by_outcome(tmp_path):
    run_dir = run_train(
        tmp_path,
        "steps=2",
        "warmup.steps=60",
        "warmup.reuse=false",
        "task.train_size=256",
        "task.eval_size=16",
        "rollout.prompts_per_step=4",
        "learner.mini_batch_size=16",
        "eval.n=1",
        config=TESTBED,
    )
    rows = read_metrics(run_dir)
    for step in (1, 2):
        row = rows[step]
        assert 0 < row["response_length/mean"] <= 225
        # every response is scored: correct, incorrect, or both
        assert "response_length/correct" in row or "response_length/incorrect" in row
    assert "eval/accuracy_greedy" in rows[0] and "eval/accuracy_greedy" in rows[2]
