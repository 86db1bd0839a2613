"""Rewards routed by data source: per-source component lists (`reward.sources`), their
validation, and the pool scoring each sample with its route's components alone, with
per-source metrics.

The reward functions below are referenced by import path
("tests.rewards.test_rewards_routing:...") as a user's would be.
"""

from __future__ import annotations

import math

import pytest
import yaml
from pydantic import BaseModel, Field, ValidationError

from rlpost.config.load import _format_error
from rlpost.rewards import build_task
from rlpost.rewards.base import Problem
from rlpost.rewards.config import ComponentConfig, RewardConfig
from rlpost.rewards.scoring.pool import RewardPool, RewardResult

NAN = math.nan
HERE = "tests.rewards.test_rewards_routing"


def field_bonus(response: str, problem: Problem, bonus: float) -> float:
    """The row's `bonus` field: a call on a problem without it raises (TypeError)."""
    return float(bonus)


class WithReward(BaseModel):
    """The reward section as TrainConfig holds it."""

    reward: RewardConfig = Field(default_factory=RewardConfig)


def reward_error(reward: dict) -> str:
    with pytest.raises(ValidationError) as info:
        WithReward.model_validate({"reward": reward})
    return _format_error("run.yaml", info.value)


FORMAT = {"name": "format", "weight": 0.5}
OVERLONG = {"name": "overlong", "args": {"max_length": 30, "buffer": 10}}
LENGTH = {"name": "length", "weight": 0.25, "args": {"target": 10, "tolerance": 20}}
BONUS = {"name": "function", "label": "bonus", "weight": 2.0, "args": {"path": f"{HERE}:field_bonus"}}
THREE_ROUTES = {
    "components": [{"name": "task"}, FORMAT, OVERLONG],  # the default route
    "sources": {
        "gsm": [LENGTH, {"name": "math"}, FORMAT],  # verifier: math, its first per-sample one
        "custom": [BONUS, {"name": "task"}],  # verifier: task, though not first
    },
    "num_workers": 1,
}


# ----- config --------------------------------------------------------------------------
def test_routes_verifiers_and_the_union():
    cfg = RewardConfig.model_validate(THREE_ROUTES)
    assert [c.key for c in cfg.route("gsm")] == ["length", "math", "format"]
    assert [c.key for c in cfg.route("custom")] == ["bonus", "task"]
    for other in ("", "arith", "GSM"):
        assert cfg.route(other) is cfg.components
    assert [cfg.verifier(s) for s in ("gsm", "custom", "", "arith")] == ["math", "task", "task", "task"]
    assert [c.key for c in cfg.all_components()] == ["task", "format", "overlong", "length", "math", "bonus"]
    assert RewardConfig.model_validate(cfg.model_dump()) == cfg  # dumps and reloads


def test_without_sources_a_route_of_length_components_is_still_valid():
    cfg = RewardConfig(components=[ComponentConfig(name="length", args={"target": 2, "tolerance": 2})])
    assert cfg.route("x") == cfg.components and [c.key for c in cfg.all_components()] == ["length"]
    with pytest.raises(ValueError, match="source 'x' are all length components"):
        cfg.verifier("x")


def test_the_same_component_may_serve_several_routes():
    cfg = RewardConfig.model_validate(
        {
            "components": [{"name": "code", "args": {"wall_s": 2}}, {"name": "format", "weight": 1}],
            # spelled differently, the same: a default given, a weight as a float
            "sources": {
                "apps": [{"name": "code", "args": {"wall_s": 2.0, "cpu_s": 5}}],
                "x": [{"name": "format", "weight": 1.0}],
            },
        }
    )
    assert [c.key for c in cfg.all_components()] == ["code", "format"]
    with pytest.raises(ValidationError, match="'format' is configured differently"):
        RewardConfig.model_validate({"components": [{"name": "format"}], "sources": {"x": [FORMAT]}})


def test_the_docstring_example_loads():
    import rlpost.rewards.config as module

    text = module.__doc__.split("```yaml")[1].split("```")[0]
    text = text.replace("my_rewards:judge", f"{HERE}:field_bonus")  # importable here
    cfg = WithReward.model_validate(yaml.safe_load(text)).reward
    assert sorted(cfg.sources) == ["apps", "my_data"]
    assert cfg.verifier("apps") == "code" and cfg.verifier("my_data") == "function"


@pytest.mark.parametrize(
    "reward, expected",
    [
        ({"sources": {"code": []}}, "key 'reward': reward.sources.code: no components; list at least one"),
        (
            {"sources": {"code": [{"name": "format"}, {"name": "format"}]}},
            "reward.sources.code.1: a second component named 'format'; give one a different label",
        ),
        (
            {"sources": {"code": [{"name": "task", "label": "mean"}]}},
            "reward.sources.code.0: 'mean' is taken by the trainer's reward/mean metric",
        ),
        (
            {
                "components": [{"name": "format", "weight": 0.2}],
                "sources": {"gsm": [{"name": "math"}, FORMAT]},
            },
            "reward.sources.gsm.1: 'format' is configured differently in reward.components.0; "
            "one key is one component in every route: give one a different label",
        ),
        (
            {
                "sources": {
                    "a": [{"name": "task"}, {"name": "format", "args": {"pattern": "x"}}],
                    "b": [{"name": "format", "args": {"pattern": "y"}}],
                }
            },
            "reward.sources.b.0: 'format' is configured differently in reward.sources.a.1",
        ),
        (
            {"sources": {"code": [{"name": "code", "args": {"wall_s": 30}}]}},
            "reward.sources.code.0.args.wall_s (30.0) must be below reward.timeout_s (10.0)",
        ),
        (
            {"sources": {"x": [OVERLONG]}},
            "reward.sources.x: only length components; add a per-sample component",
        ),
        (
            {"components": [OVERLONG], "sources": {"x": [{"name": "math"}]}},
            "reward.components: only length components",
        ),
        (
            {"sources": {"x": [{"name": "mth"}]}},
            "key 'reward.sources.x.0.name': unknown reward component 'mth'",
        ),
        (
            {"sources": {"x": [{"name": "format", "args": {"patern": "x"}}]}},
            "key 'reward.sources.x.0.args': unknown arg 'patern' of reward 'format'",
        ),
        ({"sources": ["x"]}, "key 'reward.sources': Input should be a valid dictionary"),
    ],
)
def test_route_errors_name_the_key(reward, expected):
    message = reward_error(reward)
    assert message.startswith("run.yaml: ") and expected in message, message


# ----- the pool ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def routed():
    """Seven samples of four sources (three routes: "other" takes the default one), as
    (responses, problems, lengths), and their result."""
    samples = [
        ("5", Problem("2+3=", "5", source="arith"), 10),
        ("<think>a</think><answer>6</answer>", Problem("2+3=", "5", source="arith"), 24),
        (r"<think>half</think><answer>\frac12</answer>", Problem("q", r"\frac{1}{2}", source="gsm"), 10),
        ("it is 8", Problem("q", "7", source="gsm"), 30),
        ("7", Problem("3+4=", "7", {"fields": {"bonus": 0.25, "other": "x"}}, source="custom"), 50),
        ("8", Problem("3+4=", "7", {"fields": {"bonus": 1.0}}, source="custom"), 5),
        ("2", Problem("1+1=", "2", source="other"), 40),
    ]
    responses, problems, lengths = (list(t) for t in zip(*samples))
    cfg = RewardConfig.model_validate(THREE_ROUTES)
    with RewardPool(cfg, build_task("arithmetic", {})) as pool:
        return pool.score(responses, problems, lengths)


def test_each_sample_is_scored_by_its_route_alone(routed):
    assert routed.sources == ["arith", "arith", "gsm", "gsm", "custom", "custom", "other"]
    expected = {
        "task": [1.0, 0.0, NAN, NAN, 1.0, 0.0, 1.0],
        "format": [0.0, 1.0, 1.0, 0.0, NAN, NAN, 0.0],
        "overlong": [0.0, -0.4, NAN, NAN, NAN, NAN, -1.0],
        "length": [NAN, NAN, 0.0, -1.0, NAN, NAN, NAN],
        "math": [NAN, NAN, 1.0, 0.0, NAN, NAN, NAN],
        "bonus": [NAN, NAN, NAN, NAN, 0.25, 1.0, NAN],
    }
    assert list(routed.components) == list(expected)
    for key, values in expected.items():
        assert routed.components[key] == pytest.approx(values, nan_ok=True), key
    # arith: task + 0.5 format + overlong; gsm: 0.25 length + math + 0.5 format;
    # custom: 2 bonus + task
    assert routed.totals == pytest.approx([1.0, 0.5 - 0.4, 1.5, -0.25, 1.5, 2.0, 0.0])
    # the verifier: task by default and for custom (bonus 1 is not correct), math for gsm
    assert routed.correct == [True, False, True, False, True, False, True]
    # bonus off its route would have raised (no `bonus` field): it was never called
    assert routed.failures == {"raised": 0, "timed_out": 0} and routed.example is None


def test_metrics_overall_and_per_source(routed):
    overall = {
        "reward/task": 3 / 5,
        "reward/format": 2 / 5,
        "reward/overlong": -1.4 / 3,
        "reward/length": -0.5,
        "reward/math": 0.5,
        "reward/bonus": 0.625,
        "reward/failures/raised": 0.0,
        "reward/failures/timed_out": 0.0,
    }
    assert routed.metrics() == pytest.approx(overall)
    per_source = {
        "reward/arith/task": 0.5,
        "reward/arith/format": 0.5,
        "reward/arith/overlong": -0.2,
        "reward/arith/mean": 0.55,
        "accuracy/arith": 0.5,
        "reward/gsm/format": 0.5,
        "reward/gsm/length": -0.5,
        "reward/gsm/math": 0.5,
        "reward/gsm/mean": 0.625,
        "accuracy/gsm": 0.5,
        "reward/custom/task": 0.5,
        "reward/custom/bonus": 0.625,
        "reward/custom/mean": 1.75,
        "accuracy/custom": 0.5,
        "reward/other/task": 1.0,
        "reward/other/format": 0.0,
        "reward/other/overlong": -1.0,
        "reward/other/mean": 0.0,
        "accuracy/other": 1.0,
        "accuracy/all": 4 / 7,
    }
    assert routed.metrics(per_source=True) == pytest.approx({**overall, **per_source})


def test_results_add_up(routed):
    twice = routed + routed
    assert twice.sources == routed.sources * 2 and twice.correct == routed.correct * 2
    assert twice.components["bonus"] == pytest.approx(routed.components["bonus"] * 2, nan_ok=True)
    assert twice.metrics(per_source=True) == pytest.approx(routed.metrics(per_source=True))


def test_a_result_built_by_hand_defaults_to_one_source_and_the_task_verifier():
    result = RewardResult([1.0, 0.5], {"task": [1.0, 0.5]}, {"raised": 0, "timed_out": 0}, None)
    assert result.sources == ["", ""] and result.correct == [True, False]
    assert result.metrics(per_source=True)["accuracy/all"] == 0.5


def test_a_worker_death_on_one_route_leaves_the_others_uncalled():
    cfg = RewardConfig.model_validate(
        {
            "components": [{"name": "task"}],
            "sources": {
                "risky": [
                    {"name": "task"},
                    {
                        "name": "function",
                        "label": "die",
                        "args": {"path": "tests.rewards.test_rewards_pool:die_on_request"},
                    },
                ]
            },
            "num_workers": 1,
        }
    )
    problems = [Problem("1+1=", "2", source=s) for s in ("", "risky", "risky")]
    with RewardPool(cfg, build_task("arithmetic", {})) as pool:
        result = pool.score(["die", "die", "2"], problems)
    assert result.components["task"] == [0.0, 0.0, 1.0]
    assert result.components["die"] == pytest.approx([NAN, 0.0, 1.0], nan_ok=True)
    assert result.totals == [0.0, 0.0, 2.0] and result.correct == [False, False, True]
    assert result.failures == {"raised": 1, "timed_out": 0}
    assert result.example.startswith("die: reward worker died (exit code 3)")
