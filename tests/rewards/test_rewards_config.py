"""The reward: config section and task names: errors name the key, before anything starts."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, ValidationError

from rlpost.config.load import _format_error
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config
from rlpost.rewards.config import ComponentConfig, RewardConfig


class WithReward(BaseModel):
    """The reward section as TrainConfig holds it."""

    reward: RewardConfig = Field(default_factory=RewardConfig)


def reward_error(components: list, **cfg) -> str:
    with pytest.raises(ValidationError) as info:
        WithReward.model_validate({"reward": {"components": components, **cfg}})
    return _format_error("run.yaml", info.value)


def test_default_is_the_task_score_with_weight_1():
    cfg = RewardConfig()
    assert [(c.name, c.weight, c.args) for c in cfg.components] == [("task", 1.0, {})]
    assert RewardConfig.model_validate(cfg.model_dump()) == cfg  # dumps and reloads


def test_components_with_weights_labels_and_args():
    cfg = WithReward.model_validate(
        {
            "reward": {
                "num_workers": 3,
                "timeout_s": 5,
                "components": [
                    {"name": "math"},
                    {"name": "format", "weight": 0.1, "label": "tags"},
                    {"name": "code", "args": {"wall_s": 2, "memory_mb": 256}},
                    {
                        "name": "function",
                        "args": {
                            "path": "tests.rewards.test_rewards_pool:length_or_raise",
                            "kwargs": {"limit": 3},
                        },
                    },
                ],
            }
        }
    ).reward
    assert [c.key for c in cfg.components] == ["math", "tags", "code", "function"]
    assert cfg.components[1].weight == 0.1 and cfg.num_workers == 3


@pytest.mark.parametrize(
    "components, expected",
    [
        (
            [{"name": "task"}, {"name": "mth"}],
            "key 'reward.components.1.name': unknown reward component 'mth'; known: code, format, "
            "function, length, math, overlong, task; did you mean math?",
        ),
        (
            [{"name": "format", "args": {"patern": "x"}}],
            "key 'reward.components.0.args': unknown arg 'patern' of reward 'format'; known: pattern",
        ),
        (
            [{"name": "format", "args": {"pattern": "(("}}],
            "key 'reward.components.0.args': arg 'pattern': not a regular expression",
        ),
        (
            [{"name": "code", "args": {"wall_s": "fast"}}],
            "key 'reward.components.0.args': arg 'wall_s': Input should be a valid number",
        ),
        (
            [{"name": "code", "args": {"memory_mb": 0}}],
            "key 'reward.components.0.args': memory_mb must be > 0, got 0",
        ),
        (
            [{"name": "length", "args": {"target": 5}}],
            "key 'reward.components.0.args': arg 'tolerance': Field required",
        ),
        (
            [{"name": "overlong", "args": {"max_length": 5, "buffer": 10}}],
            "key 'reward.components.0.args': buffer (10) must not exceed max_length (5)",
        ),
        (
            [{"name": "function", "args": {"path": "no_such_module:f"}}],
            "key 'reward.components.0.args': arg 'path': cannot import 'no_such_module:f'",
        ),
        ([{"name": "function", "args": {"path": "os.path"}}], "is not of the form 'package.module:function'"),
        ([{"name": "task", "weight": "heavy"}], "key 'reward.components.0.weight'"),
        ([{"name": "task"}, {"name": "task"}], "a second component named 'task'"),
        ([{"name": "format", "label": "std"}], "'std' is taken by the trainer's reward/std metric"),
        (
            [{"name": "code", "args": {"wall_s": 30}}],
            "reward.components.0.args.wall_s (30.0) must be below reward.timeout_s (10.0)",
        ),
        ([], "key 'reward.components': List should have at least 1 item"),
    ],
)
def test_errors_name_the_key(components, expected):
    message = reward_error(components)
    assert message.startswith("run.yaml: ") and expected in message, message


def test_pool_settings_are_checked():
    assert "key 'reward.timeout_s'" in reward_error([{"name": "task"}], timeout_s=0)
    assert "key 'reward.num_workers'" in reward_error([{"name": "task"}], num_workers=0)
    with pytest.raises(ValidationError):
        ComponentConfig(name="task", weight=float("nan"))


def test_reasoning_gym_task_name_loads(tmp_path):
    cfg = load_config(None, ["task.name=reasoning_gym:chain_sum", "task.args={min_terms: 3}"])
    assert cfg.task.name == "reasoning_gym:chain_sum"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["task.name=reasoning_gym:chain_sun"],
            "<defaults> (with overrides): key 'task.name': unknown reasoning-gym task 'chain_sun'; "
            "did you mean reasoning_gym:chain_sum",
        ),
        (
            ["task.name=reasoning_gym:chain_sum", "task.args={min_termz: 3}"],
            "key 'task.args': reasoning-gym task 'chain_sum': ChainSumConfig.__init__() got an "
            "unexpected keyword argument 'min_termz'",
        ),
        (
            ["task.name=reasoning_gym:chain_sum", "task.args={min_terms: 5, max_terms: 2}"],
            "key 'task.args': reasoning-gym task 'chain_sum': max_terms must be >= min_terms",
        ),
        (
            ["task.name=arithmetc"],
            "key 'task.name': unknown task 'arithmetc'; known: arithmetic, chain, "
            "or reasoning_gym:<name> for a reasoning-gym task",
        ),
        (["task.args={digit: 3}"], "key 'task.args': "),
    ],
)
def test_task_errors_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert expected in str(info.value), str(info.value)
