"""Credit beyond the outcome through the CLI (docs/algorithms.md section 5): each method trains
on the testbed's task with the metrics it promises, and a run resumed from its middle
checkpoint repeats the uninterrupted one exactly, the critic's and the PRM's state included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.run_helpers import ROOT, read_metrics, run_train

CHAIN = ROOT / "tests" / "configs" / "chain_tiny.yaml"
STEPS = ("step_credit.split=;",)
METHODS = {
    "ppo": ("algorithm.name=ppo", "critic.lr=1.0e-3"),
    "vineppo": ("algorithm.name=vineppo", "algorithm.continuations=2", "algorithm.max_boundaries=2", *STEPS),
    "pure": ("algorithm.name=pure", *STEPS),
    "prime": ("algorithm.name=prime", "prm.lr=1.0e-4"),
    "optimal_baseline": ("algorithm.name=optimal_baseline",),
}
PROMISED = {
    "ppo": ("critic/value_loss", "critic/clip_frac", "critic/explained_variance"),
    "vineppo": (
        "vine/continuations",
        "vine/continuation_tokens",
        "vine/continuation_tokens_per_rollout_token",
    ),
    "pure": ("steps/reward_mean", "steps/per_response"),
    "prime": ("prm/accuracy", "prm/loss", "prm/token_reward_mean"),
    "optimal_baseline": (),
}


def assert_resume_repeats(run: Path, tmp_path: Path, last: int) -> None:
    full = read_metrics(run)
    copy = tmp_path / "resumed" / run.name
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / f"step_{last}")
    shutil.rmtree(copy / "final_model")
    run_train(tmp_path / "resumed", f"resume={copy}", config=CHAIN)
    resumed = read_metrics(copy)
    assert set(resumed[last]) == set(full[last])
    for key, value in full[last].items():
        assert resumed[last][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def check_method(name: str, tmp_path: Path) -> Path:
    run = run_train(tmp_path / "full", *METHODS[name], "save_every=1", "eval_every=2", config=CHAIN)
    metrics = read_metrics(run)
    for step in (1, 2):
        for key in PROMISED[name]:
            assert key in metrics[step], (step, key)
        # per-token credit: the advantages by position are reported
        assert any(k.startswith("advantage/pos_0_15/") for k in metrics[step]), step
    html = run / "credit" / "credit_step_2.html"
    assert html.is_file() and (run / "credit" / "credit_step_2.png").is_file()
    return run


def test_ppo_trains_the_critic_and_resumes_exactly(tmp_path):
    run = check_method("ppo", tmp_path)
    assert (run / "checkpoints" / "step_1" / "critic").is_dir()
    assert_resume_repeats(run, tmp_path, 2)


def test_vineppo_samples_continuations_at_step_boundaries(tmp_path):
    run = check_method("vineppo", tmp_path)
    m = read_metrics(run)[1]
    # 16 responses, at most 2 steps each after merging: at most one boundary each, 2 continuations
    assert m["vine/continuations"] == 2 * m["vine/boundaries"] <= 32


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pure", "optimal_baseline"])
def test_step_and_token_baselines_train(name, tmp_path):
    check_method(name, tmp_path)


@pytest.mark.slow
def test_prime_trains_its_prm_and_resumes_exactly(tmp_path):
    run = check_method("prime", tmp_path)
    assert (run / "checkpoints" / "step_1" / "prm").is_dir()
    assert_resume_repeats(run, tmp_path, 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, placement",
    [("ppo", ("critic.placement=with_learners",)), ("prime", ()), ("vineppo", ())],
)
def test_ray_runs_match_in_process(name, placement, tmp_path):
    """On Ray (the critic as actors sharing the learners' bundles; PRIME's PRM in bundles of its
    own; VinePPO's continuations from a rollout actor) the steps are the in-process run's."""
    args = (*METHODS[name], "eval_every=0")
    local = read_metrics(run_train(tmp_path / "local", *args, config=CHAIN))
    ray = read_metrics(run_train(tmp_path / "ray", *args, "mode=ray", *placement, config=CHAIN))
    for step in (1, 2):
        assert set(ray[step]) == set(local[step])
        for key, value in local[step].items():
            assert ray[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
