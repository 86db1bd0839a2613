"""Config errors stop `rlpost train` before any worker starts, with one line naming key or file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "rlpost.cli", "train", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        ((QUICKSTART, "rollout.engin=vllm"), "unknown key 'rollout.engin'"),
        ((QUICKSTART, "rollout.n=many"), "key 'rollout.n'"),
        ((QUICKSTART, "algorithm.clip_eps=0.3"), "unknown key 'algorithm.clip_eps'"),
        (("configs/nope.yaml",), "config file not found: configs/nope.yaml"),
        ((QUICKSTART, "model.kind=hf", "model.path=/no/such/dir"), "directory not found: /no/such/dir"),
        ((QUICKSTART, "resume=/no/such/run"), "/no/such/run is not a run directory"),
    ],
)
def test_cli_config_errors_are_one_line(args, expected):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rlpost: error: ") and expected in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_no_held_out_problem_is_an_error_before_start_up(tmp_path):
    # 1-digit addition has 100 problems: 4096 training problems draw every one
    proc = run_cli(QUICKSTART, "task.args.digits=1", f"output_dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(
        "rlpost: error: key 'task.train_size': the 100 distinct training problems include every problem"
    )


def test_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=rf"{bad}: key 'learner.lr'.*'fast'"):
        load_config(bad)
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{bad}: line \d+ is not valid YAML"):
        load_config(bad)


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        QUICKSTART,
        ["rollout.n=4", "learner.lr=1e-4", "algorithm.clip_eps_high=0.28", "learner.mini_batch_size=64"],
    )
    assert cfg.rollout.n == 4 and cfg.learner.lr == 1e-4
    assert cfg.algorithm.params()["clip_eps_high"] == 0.28


def test_batch_shape_checked():
    with pytest.raises(ConfigError, match="learner.mini_batch_size"):
        load_config(QUICKSTART, ["learner.mini_batch_size=100"])
    with pytest.raises(ConfigError, match="inprocess"):
        load_config(QUICKSTART, ["mode=inprocess", "learner.num_learners=2"])


def test_stops_from_overrides():
    rollout = load_config(QUICKSTART, ['rollout.stop=["9+", "="]', "rollout.stop_token_ids=[2, 13]"]).rollout
    assert (rollout.stop, rollout.stop_token_ids) == (["9+", "="], [2, 13])
    assert load_config(QUICKSTART, ["rollout.stop=</answer>"]).rollout.stop == ["</answer>"]
    assert load_config(QUICKSTART).rollout.stop == [] and load_config(QUICKSTART).rollout.stop_token_ids == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (['rollout.stop=["9+", ""]'], "key 'rollout': rollout.stop must not contain an empty string"),
        (["rollout.stop_token_ids=[2, -1]"], r"key 'rollout': rollout.stop_token_ids must be token ids >= 0"),
        (["rollout.stop_token_ids=[eos]"], r"key 'rollout.stop_token_ids.0'"),
        (
            ["rollout.engine=vllm", "rollout.max_new_tokens=128"],
            r"key 'rollout': rollout.max_new_tokens \(128\) must be less than "
            r"rollout.vllm.max_model_len \(128\), which holds the prompt tokens too",
        ),
        (
            ["rollout.engine=vllm", "rollout.max_new_tokens=4096", "rollout.vllm.max_model_len=4000"],
            r"rollout.max_new_tokens \(4096\) must be less than rollout.vllm.max_model_len \(4000\)",
        ),
    ],
)
def test_rollout_stop_and_length_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, overrides)


def test_long_responses_fit():
    # the vLLM context must hold prompt + response; the HF engine has no such limit
    long = ["rollout.max_new_tokens=4096"]
    assert load_config(QUICKSTART, long).rollout.max_new_tokens == 4096
    cfg = load_config(QUICKSTART, [*long, "rollout.engine=vllm", "rollout.vllm.max_model_len=8192"])
    assert (cfg.rollout.max_new_tokens, cfg.rollout.vllm.max_model_len) == (4096, 8192)
