"""warmup.reuse: a run that would train the same warm-up as an earlier one starts from
it, and the two runs then train alike."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

from rlpost.jobs.preflight import load_config
from rlpost.jobs.warmup_reuse import warmup_key
from tests.run_helpers import TINY, read_metrics, run_train


def key(*overrides: str) -> str:
    return warmup_key(load_config(TINY, list(overrides)))


def test_the_key_covers_what_the_warmup_reads_and_nothing_else():
    base = key()
    for changed in (
        "seed=4",
        "warmup.steps=11",
        "model.hidden_size=32",
        "task.args.digits=2",
        "learner.zero_stage=0",
    ):
        assert key(changed) != base, changed
    # RL-only settings: the same warm-up
    for same in (
        "learner.lr=0.01",
        "algorithm.loss_agg=balanced",
        "steps=9",
        "rollout.n=8",
        "learner.epochs=1",
    ):
        assert key(same) == base, same


@pytest.mark.slow  # three short runs, about 40 s
def test_a_second_run_reuses_the_warmup_and_trains_alike(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPOST_CACHE", str(tmp_path / "cache"))
    first = run_train(tmp_path / "a", "warmup.reuse=true")
    shared = tmp_path / "cache" / "warmups" / key("warmup.reuse=true")
    assert (shared / "tokenizer_config.json").is_file()
    second = run_train(tmp_path / "b", "warmup.reuse=true", "algorithm.loss_agg=balanced")
    third = run_train(tmp_path / "c", "algorithm.loss_agg=balanced")  # trains its own
    weights = [load_file(d / "models" / "warmup" / "model.safetensors") for d in (first, second, third)]
    for name, w in weights[0].items():
        assert (weights[1][name] == w).all() and (weights[2][name] == w).all(), name
    # the second run took the shared files (hard links on one file system): it did not train
    assert os.path.samefile(second / "models" / "warmup" / "model.safetensors", shared / "model.safetensors")
    assert read_metrics(second) == read_metrics(third)
