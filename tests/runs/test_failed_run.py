"""A real run through the CLI whose checkpoint write runs out of space after start-up: the
error leaves the run directory marked FAILED with its one-line reason and the previous
checkpoint intact; resuming it finishes the run and keeps only `save_keep_last`
checkpoints (issue 22). And an over-long prompt row is skipped and reported, not run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.config.test_bad_inputs import FILES_CONFIG
from tests.run_helpers import ROOT, TINY, only_run_dir, run_train

OUT_OF_SPACE_AT_STEP_3 = """
import errno, os, sys
from rlpost.workers.policy_rank import PolicyRank
write = PolicyRank.save_checkpoint
def save_checkpoint(self, ckpt_dir, tag):
    write(self, ckpt_dir, tag)  # DeepSpeed's files are written, then the disk is full
    if tag == "step_3":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
PolicyRank.save_checkpoint = save_checkpoint
from rlpost.cli import main
sys.exit(main(sys.argv[1:]))
"""
QUICK = ["warmup.steps=0", "eval_every=0", "save_every=1", "save_keep_last=1"]


@pytest.mark.slow
def test_out_of_space_marks_the_run_failed_and_resume_finishes_it(tmp_path):
    env = {**os.environ, "RLPOST_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", OUT_OF_SPACE_AT_STEP_3, "train", str(TINY), f"output_dir={tmp_path}", *QUICK],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    run = only_run_dir(tmp_path)
    reason = (
        "CheckpointError: checkpoint step_3 could not be written (OSError: [Errno 28] No space left "
        "on device); it was removed and the last complete one, step_2, is intact\n"
    )
    assert (run / "FAILED").read_text() == reason
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_2"]
    assert not (run / "final_model").exists()

    resumed = run_train(tmp_path, f"resume={run}")
    assert resumed == run and not (run / "FAILED").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_4"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_prompt_longer_than_the_model_is_skipped_and_reported(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "1+" * 5_000_000 + "1=", "solution": "2"}]
    rows += [{"prompt": f"{i}+1=", "solution": str(i + 1)} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "files.yaml"
    config.write_text(FILES_CONFIG)
    env = {**os.environ, "RLPOST_THREADS": "1", "RLPOST_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlpost.cli",
            "train",
            str(config),
            f"output_dir={tmp_path / 'runs'}",
            f"data.train_files={data}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data: {data}: 9 rows, 8 prompts kept, 1 skipped: too_long 1 (row 0)" in proc.stdout
    assert (only_run_dir(tmp_path / "runs") / "final_model").is_dir()
