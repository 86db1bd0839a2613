"""`rollout.staleness`, `rollout.async_mode` and `off_policy` are checked when the config
loads: one line naming the keys."""

from __future__ import annotations

import os

import pytest

from rlpost.config.load import read_train_config
from rlpost.errors import ConfigError


def test_synchronous_and_uncorrected_by_default():
    cfg = read_train_config(None)
    assert cfg.rollout.staleness == 0 and cfg.rollout.async_mode == "deterministic"
    assert cfg.off_policy.correction == "none" and cfg.learner.logprob_kernel == "chunked"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.async_mode=streaming"], "rollout.async_mode 'streaming' needs rollout.staleness >= 1"),
        (
            ["rollout.staleness=1", "ray.placement=colocated", "learner.offload_optimizer=true"],
            "learner.offload_optimizer makes the engines and learners take turns",
        ),
        (["rollout.staleness=-1"], "rollout.staleness"),
        (["off_policy.correction=is"], "off_policy.correction"),
        (["rollout.stream.too_stale=later"], "rollout.stream.too_stale"),
        (["learner.logprob_kernel=auto"], "learner.logprob_kernel"),
    ],
)
def test_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        read_train_config(None, overrides)
    assert message in str(e.value)


def test_overlapping_roles_split_the_cores_unless_told(monkeypatch):
    from rlpost.jobs.session import split_threads

    for name in ("RLPOST_THREADS", "RLPOST_THREADS_ROLLOUT", "RLPOST_THREADS_LEARNER"):
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores what was there
        monkeypatch.delenv(name)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    split_threads(read_train_config(None))  # synchronous: every core each, as before
    assert "RLPOST_THREADS_ROLLOUT" not in os.environ
    monkeypatch.setenv("RLPOST_THREADS_LEARNER", "3")
    split_threads(read_train_config(None, ["rollout.staleness=1"]))
    assert os.environ["RLPOST_THREADS_ROLLOUT"] == "4" and os.environ["RLPOST_THREADS_LEARNER"] == "3"
