"""`rollout.vllm.sleep_level` and `learner.offload_optimizer` are checked when the config
loads: one line naming the key (rlpost/config/colocation.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlpost.config.load import read_train_config
from rlpost.config.offline import read_offline_config
from rlpost.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
VLLM = ["rollout.engine=vllm"]
COLOCATED = ["ray.placement=colocated"]


def test_both_off_by_default():
    cfg = read_train_config(None)
    assert cfg.rollout.vllm.sleep_level == 0 and cfg.learner.offload_optimizer is False


@pytest.mark.parametrize(
    "overrides",
    [
        [*VLLM, *COLOCATED, "rollout.vllm.sleep_level=1"],
        [*VLLM, "mode=inprocess", "rollout.vllm.sleep_level=2"],
        [*COLOCATED, "learner.offload_optimizer=true"],
        [*COLOCATED, "learner.offload_optimizer=true", "learner.zero_stage=2"],
        ["mode=inprocess", "learner.offload_optimizer=true"],
        [*VLLM, *COLOCATED, "rollout.vllm.sleep_level=2", "learner.offload_optimizer=true"],
    ],
)
def test_accepted(overrides):
    read_train_config(None, overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [*COLOCATED, "rollout.vllm.sleep_level=1"],
            "key 'rollout.vllm.sleep_level': 1 needs rollout.engine=vllm",
        ),
        (
            [*VLLM, "rollout.vllm.sleep_level=1"],
            "key 'rollout.vllm.sleep_level': frees GPU memory for the engine or learner that "
            "shares the GPU, so it needs ray.placement=colocated",
        ),
        (["learner.offload_optimizer=true"], "key 'learner.offload_optimizer': frees GPU memory"),
        (
            [*COLOCATED, "learner.offload_optimizer=true", "learner.zero_stage=0"],
            "key 'learner.offload_optimizer': needs learner.zero_stage 1 or 2 (got 0)",
        ),
        (
            [*COLOCATED, "learner.offload_optimizer=true", "learner.zero_stage=3"],
            "key 'learner.offload_optimizer': needs learner.zero_stage 1 or 2 (got 3)",
        ),
        ([*VLLM, *COLOCATED, "rollout.vllm.sleep_level=3"], "key 'rollout.vllm.sleep_level'"),
    ],
)
def test_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        read_train_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_offline_jobs_have_no_optimizer_offload(tmp_path):
    # nothing shares an offline job's GPUs, so the key is not there to set
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    with pytest.raises(ConfigError, match="unknown key 'learner.offload_optimizer'"):
        read_offline_config(
            "dpo",
            ROOT / "tests" / "configs" / "dpo_tiny.yaml",
            [f"data.path={data}", "learner.offload_optimizer=true"],
        )
