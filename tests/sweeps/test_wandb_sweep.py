"""A sweep's run in W&B (offline mode, read back from the run's transaction log): the
sweep as its group, the varied keys as its name and tags, the whole resolved config,
and its metrics at their steps."""

from __future__ import annotations

from rlpost.sweeps.sweep import load_sweep
from rlpost.tracking.tracker import Tracker
from tests.run_helpers import ROOT
from tests.tracking.test_tracking import _offline_run, wandb_env  # noqa: F401  (wandb_env is a fixture)


def test_sweep_run_carries_group_name_tags_and_config(wandb_env, tmp_path):
    sweep = load_sweep(
        ROOT / "configs" / "sweeps" / "aggregation.yaml",
        ["tracking.wandb=offline", "tracking.project=rlpost-tests"],
        output_dir=str(tmp_path / "sweeps"),
    )
    run = sweep.runs[5]
    cfg = sweep.resolve(run)
    assert (run.arm, run.seed) == ("aggregation-balanced", 1)

    tracker = Tracker(wandb_env, cfg)
    for step in (0, 1, 2):
        tracker.log({"reward/mean": step / 4, "entropy": 1.0 - step / 8}, step)
    tracker.close()

    run_id = (wandb_env / "wandb_id.txt").read_text().strip()
    (record,) = _offline_run(wandb_env, run_id)
    assert record["run"].run_group == "aggregation"
    assert record["run"].display_name == "aggregation-balanced,seed=1"
    assert list(record["run"].tags) == [
        "name=ablation-aggregation-balanced",
        "algorithm.loss_agg=balanced",
        "arm=aggregation-balanced",
        "seed=1",
    ]
    assert record["run"].project == "rlpost-tests"
    config = {k: v for k, v in record["config"].items() if k != "_wandb"}
    assert config == cfg.model_dump(mode="json")
    assert config["algorithm"]["loss_agg"] == "balanced" and config["seed"] == 1
    assert record["history"] == [
        (0, {"reward/mean": 0.0, "entropy": 1.0}),
        (1, {"reward/mean": 0.25, "entropy": 0.875}),
        (2, {"reward/mean": 0.5, "entropy": 0.75}),
    ]
