"""A real sweep through the CLI: two arms of the tiny job, killed in its first run and
run again (the run resumes from its checkpoint), run a third time (nothing to do),
with W&B offline and the report at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.run_helpers import ROOT, TINY, read_metrics
from tests.tracking.test_tracking import _read_wandb_records

SWEEP = f"""
name: tiny-sweep
base: {TINY}
seeds: [0]
overrides: {{mode: inprocess, steps: 2, save_every: 1, warmup.steps: 4,
             tracking.wandb: offline, tracking.project: rlpost-tests}}
grid:
  algorithm.loss_agg: [token-mean, balanced]
"""


def saved(state_file) -> bool:
    """The trainer writes trainer_state.json in place: it is saved once it parses."""
    try:
        return "step" in json.loads(state_file.read_text())
    except (OSError, ValueError):
        return False


def last_wandb_run(run_dir):
    """The run record of the run directory's latest offline W&B run (a killed run's
    first one may hold no more than its header)."""
    wandb_id = (run_dir / "wandb_id.txt").read_text().strip()
    latest = sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))[-1]
    records = _read_wandb_records(latest / f"run-{wandb_id}.wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return run


@pytest.mark.slow
def test_sweep_resumes_a_killed_run_skips_finished_ones_and_reports(tmp_path):
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(SWEEP)
    cmd = [sys.executable, "-m", "rlpost.cli", "sweep", str(path), "--output-dir", str(tmp_path)]
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
    }
    env.pop("WANDB_API_KEY", None)
    sweep_dir = tmp_path / "tiny-sweep"
    first = sweep_dir / "runs" / "loss_agg=token-mean-seed0"

    # kill the sweep (and its run) once the first run saved its step-1 checkpoint
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(saved(p) for p in first.glob("*/checkpoints/step_1/trainer_state.json")):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    (killed_run,) = [p.parent for p in first.glob("*/config.yaml")]
    assert not (first / "done.json").exists()

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert f"[sweep 1/2] arm=loss_agg=token-mean seed=0 | resuming {killed_run}" in out
    assert "[sweep 1/2] arm=loss_agg=token-mean seed=0 | step 2/2 | eta" in out
    assert "[sweep 2/2] arm=loss_agg=balanced seed=0 | starting" in out
    assert "sweep tiny-sweep: 2 of 2 runs finished" in out
    assert f"report: {sweep_dir / 'report' / 'report.md'}" in out

    run_dirs = {}
    for arm in ("token-mean", "balanced"):
        run_id = f"loss_agg={arm}-seed0"
        record = json.loads((sweep_dir / "runs" / run_id / "done.json").read_text())
        run_dirs[arm] = sweep_dir / record["run_dir"]
        assert sorted(read_metrics(run_dirs[arm])) == [0, 1, 2]
        assert (run_dirs[arm] / "final_model" / "config.json").is_file()
        wandb_run = last_wandb_run(run_dirs[arm])
        assert wandb_run.run_group == "tiny-sweep"
        assert wandb_run.display_name == f"loss_agg={arm},seed=0"
        assert list(wandb_run.tags) == [f"algorithm.loss_agg={arm}", f"arm=loss_agg={arm}", "seed=0"]
        config = {item.key: json.loads(item.value_json) for item in wandb_run.config.update}
        assert config["algorithm"]["loss_agg"] == arm and config["tracking"]["group"] == "tiny-sweep"
    assert run_dirs["token-mean"] == killed_run  # resumed in place

    report = (sweep_dir / "report" / "report.md").read_text()
    assert "2 of 2 runs finished." in report
    assert "| loss_agg=token-mean | 0 | " in report and "| loss_agg=balanced | 0 | " in report
    assert (sweep_dir / "report" / "reward.png").read_bytes()[:4] == b"\x89PNG"

    before = {arm: (d / "metrics.jsonl").stat().st_mtime for arm, d in run_dirs.items()}
    again = subprocess.run(
        cmd + ["--no-report"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished before, skipped") == 2
    assert {arm: (d / "metrics.jsonl").stat().st_mtime for arm, d in run_dirs.items()} == before
