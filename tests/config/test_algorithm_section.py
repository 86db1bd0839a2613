"""The `algorithm` section is typed by the chosen algorithm: config.yaml holds its every
default, a dumped config loads again to an equal one (resume reads it), a setting of an
unselected option in a user's file is still refused, and `algorithm.name` takes an import
path of the right kind."""

from __future__ import annotations

import json
import pickle
import sys
import textwrap

import pytest
import yaml

from rlpost.config.load import dump_config, validate_config
from rlpost.config.rl import TrainConfig
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config, load_offline_config
from tests.run_helpers import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def round_trip(cfg, tmp_path, load):
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    return yaml.safe_load(saved.read_text()), load(saved)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["algorithm.name=hapo"],
        ["algorithm.selection=d3s", "algorithm.d3s.schedule_steps=10"],
        ["algorithm.name=hapo", "algorithm.selection=entropy_mask", "algorithm.entropy_mask_rho=0.5"],
    ],
    ids=lambda o: " ".join(o) or "quickstart",
)
def test_dump_holds_every_default_and_loads_again(tmp_path, overrides):
    cfg = load_config(QUICKSTART, overrides)
    tree, again = round_trip(cfg, tmp_path, load_config)
    algorithm = tree["algorithm"]
    assert next(iter(algorithm)) == "name"
    assert algorithm.keys() == {"name", *cfg.algorithm.params()}
    assert algorithm["kl_coef"] == 0.0 and algorithm["advantage"] == cfg.algorithm.advantage
    assert algorithm["std_eps"] == 1e-6
    # settings of an unselected option are left out: written, they would be refused
    assert ("d3s" in algorithm) == (cfg.algorithm.selection == "d3s")
    assert ("entropy_mask_rho" in algorithm) == (cfg.algorithm.selection == "entropy_mask")
    assert again == cfg and type(again.algorithm) is type(cfg.algorithm)


def test_gspo_dump_loads_again():
    cfg = TrainConfig(algorithm={"name": "gspo", "clip_eps_high": 5e-4})
    tree = yaml.safe_load(dump_config(cfg))
    assert tree["algorithm"] == {
        "name": "gspo",
        "advantage": "grpo",
        "std_eps": 1e-6,
        "clip_eps_low": 3e-4,
        "clip_eps_high": 5e-4,
    }
    assert validate_config(TrainConfig, tree, "config.yaml") == cfg


def test_quickstart_dump_names_the_algorithm_defaults():
    algorithm = yaml.safe_load(dump_config(load_config(QUICKSTART)))["algorithm"]
    assert (algorithm["name"], algorithm["kl_coef"], algorithm["advantage"], algorithm["std_eps"]) == (
        "grpo",
        0.0,
        "grpo",
        1e-6,
    )
    hapo = yaml.safe_load(dump_config(load_config(QUICKSTART, ["algorithm.name=hapo"])))["algorithm"]
    assert (hapo["advantage"], hapo["dual_clip"], hapo["tau"]) == ("hapo", 10.0, 0.05)


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)}) + "\n"
            for i in range(6)
        )
    )
    return path


@pytest.mark.parametrize(
    "job, overrides",
    [
        ("sft", []),
        ("sft", ["algorithm.loss=asft", "algorithm.asft_lambda=0.1"]),
        ("dpo", []),
        ("dpo", ["algorithm.loss=sparsepo", "algorithm.masks=common", "algorithm.mask_dropout=0.1"]),
    ],
)
def test_offline_dump_loads_again(tmp_path, pairs, job, overrides):
    config = ROOT / "tests" / "configs" / f"{job}_tiny.yaml"
    cfg = load_offline_config(job, config, [f"data.path={pairs}", *overrides])
    _, again = round_trip(cfg, tmp_path, lambda path: load_offline_config(job, path))
    assert again == cfg and again.algorithm_spec() == cfg.algorithm_spec()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["algorithm.entropy_mask_rho=0.2"],
            "algorithm.entropy_mask_rho is set but algorithm.selection is "
            "'none'; set algorithm.selection: entropy_mask",
        ),
        (["algorithm.name=hapo", "algorithm.d3s.schedule_steps=5"], "algorithm.d3s is set but"),
        (
            ["algorithm.name=preference"],
            "key 'algorithm.name': preference is a pair loss; `rlpost train` "
            "runs policy-gradient algorithms (grpo, hapo, gspo",
        ),
        (["algorithm.name=sft"], "key 'algorithm.name': sft is a token loss; `rlpost train` runs"),
        (
            ["algorithm.name=reinforce"],
            "key 'algorithm.name': unknown algorithm 'reinforce'; known: ceeh, cispo, clip_cov, dppo, gmpo, "
            "grpo, gspo, gspo_token, hapo, kl_cov",
        ),
        (["algorithm.name=gspo"], "unknown key 'algorithm.loss_agg'"),  # the quickstart sets it
        (["algorithm.name=no_such_module:Algo"], "key 'algorithm.name': no module 'no_such_module'"),
        (
            ["algorithm.name=rlpost.algorithms.gspo:Nope"],
            "module 'rlpost.algorithms.gspo' has no class 'Nope'",
        ),
        (["algorithm.name=rlpost.algorithms.sft:SFT"], "rlpost.algorithms.sft:SFT is a token loss"),
        (["algorithm.name=rlpost.algorithms.gspo:GSPOConfig"], "is not an algorithm"),
    ],
)
def test_user_file_errors_name_the_file_and_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, overrides)
    assert str(e.value).startswith(f"{QUICKSTART} (with overrides): ") and message in str(e.value)


def test_an_algorithm_of_ones_own_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_gspo.py").write_text(
        textwrap.dedent("""
        from rlpost.algorithms.gspo import GSPO, GSPOConfig

        class WideConfig(GSPOConfig):
            clip_eps_high: float = 0.01

        class Wide(GSPO):
            Config = WideConfig
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = validate_config(
        TrainConfig, {"algorithm": {"name": "my_gspo:Wide", "clip_eps_low": 0.001}}, "config.yaml"
    )
    assert type(cfg.algorithm).__mro__[1].__name__ == "WideConfig"
    assert cfg.algorithm.params() == {
        "advantage": "grpo",
        "std_eps": 1e-6,
        "clip_eps_low": 0.001,
        "clip_eps_high": 0.01,
    }
    again = pickle.loads(pickle.dumps(cfg))  # as Ray hands it to a worker
    assert again == cfg and type(again.algorithm) is type(cfg.algorithm)
    sys.modules.pop("my_gspo")


def test_section_is_typed_on_assignment_and_construction():
    cfg = TrainConfig(algorithm={"name": "hapo", "tau": 0.1})
    assert cfg.algorithm.tau == 0.1 and cfg.algorithm.dual_clip == 10.0
    cfg.algorithm = {"name": "gspo"}
    assert cfg.algorithm.clip_eps_high == 4e-4
    assert TrainConfig().algorithm == TrainConfig(algorithm={"name": "grpo"}).algorithm


@pytest.mark.parametrize(
    "job, name, message",
    [
        (
            "dpo",
            "grpo",
            "key 'algorithm.name': grpo is a policy-gradient algorithm; `rlpost dpo` runs pair losses",
        ),
        (
            "sft",
            "preference",
            "key 'algorithm.name': preference is a pair loss; `rlpost sft` runs token losses",
        ),
        (
            "sft",
            "grpo",
            "key 'algorithm.name': grpo is a policy-gradient algorithm; `rlpost sft` runs token losses",
        ),
    ],
)
def test_offline_jobs_refuse_another_kind_of_algorithm(pairs, job, name, message):
    config = ROOT / "tests" / "configs" / f"{job}_tiny.yaml"
    with pytest.raises(ConfigError) as e:
        load_offline_config(job, config, [f"data.path={pairs}", f"algorithm.name={name}"])
    assert message in str(e.value)


@pytest.mark.parametrize(
    "job, path", [("dpo", "rlpost.algorithms.preference:Preference"), ("sft", "rlpost.algorithms.sft:SFT")]
)
def test_offline_jobs_take_an_algorithm_by_import_path(pairs, job, path):
    config = ROOT / "tests" / "configs" / f"{job}_tiny.yaml"
    default = load_offline_config(job, config, [f"data.path={pairs}"])
    by_path = load_offline_config(job, config, [f"data.path={pairs}", f"algorithm.name={path}"])
    assert by_path.algorithm_spec() == (path, default.algorithm_spec()[1])
    assert default.algorithm_spec()[0] == {"dpo": "preference", "sft": "sft"}[job]
