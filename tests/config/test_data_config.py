"""The `data:` and `eval:` sections, and what the RL config checks about prompts from files."""

from __future__ import annotations

import pytest

from rlpost.config.data import EvalConfig
from rlpost.config.load import read_train_config
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def files_cfg(tmp_path, *overrides: str):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "1+1=", "reward_model": {"ground_truth": "2"}}\n')
    return load_config(write(tmp_path, "mode: inprocess\n"), [f"data.train_files={train}", *overrides])


def test_file_data_defaults_to_math_verify_and_reads_verl_keys(tmp_path):
    cfg = files_cfg(tmp_path)
    assert cfg.from_files
    assert [c.name for c in cfg.reward.components] == ["math"]
    assert (cfg.data.prompt_key, cfg.data.answer_key, cfg.data.source_key) == (
        "prompt",
        "reward_model.ground_truth",
        "data_source",
    )
    # a reward section without components keeps its other keys
    cfg = files_cfg(tmp_path, "reward.timeout_s=3")
    assert cfg.reward.timeout_s == 3 and [c.name for c in cfg.reward.components] == ["math"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["task.name=reasoning_gym:chain_sum"],
            "task.name and data.train_files both say where prompts come from",
        ),
        (["reward.components=[{name: task}]"], "reward: rows read from files have no task verifier"),
        (["warmup.steps=5"], "warmup.steps: the supervised warm-up needs a task's demonstrations"),
        (
            ["rollout.engine=vllm", "data.max_prompt_length=100", "rollout.max_new_tokens=60"],
            "data.max_prompt_length (100) + rollout.max_new_tokens (60) must fit "
            "rollout.vllm.max_model_len (128)",
        ),
        (["data.prompt_key=reward_model..x"], "is not a field name or a dotted path"),
        (["data.eval_files=/no/such/test.jsonl"], "key 'data.eval_files'"),
    ],
)
def test_file_data_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=None) as e:
        files_cfg(tmp_path, *overrides)
    assert message in str(e.value)


def test_missing_train_files_and_empty_globs_are_config_errors(tmp_path):
    config = write(tmp_path, "mode: inprocess\n")
    with pytest.raises(ConfigError, match="data.train_files"):
        load_config(config, [f"data.train_files={tmp_path}/nothing/*.parquet"])
    with pytest.raises(ConfigError, match="data.eval_files needs data.train_files"):
        read_train_config(config, [f"data.eval_files={tmp_path}/t.jsonl"])


def test_model_path_alone_names_a_hf_directory(tmp_path):
    cfg = read_train_config(write(tmp_path, "mode: inprocess\n"), ["model.path=/some/dir"])
    assert cfg.model.kind == "hf"
    assert read_train_config(write(tmp_path, "mode: inprocess\n"), []).model.kind == "tiny"
    smollm2 = write(tmp_path, "mode: inprocess\nmodel: {kind: smollm2}\n")
    assert read_train_config(smollm2, ["model.path=/run/final_model"]).model.kind == "hf"


def test_eval_k_values():
    assert EvalConfig(n=8).k_values() == [1, 2, 4, 8]
    assert EvalConfig(n=5).k_values() == [1, 2, 4, 5]
    assert EvalConfig(n=1).k_values() == [1]
    assert EvalConfig(n=6, ks=[3, 1, 3]).k_values() == [1, 3]
    with pytest.raises(ValueError, match="k = 7 must be between 1 and eval.n"):
        EvalConfig(n=6, ks=[7])
