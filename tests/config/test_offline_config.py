"""Configs of `rlpost sft` / `rlpost dpo`: validation errors naming the key, a round trip
through the run's config.yaml (what resume reads), and the one-line errors of the CLI for
bad data, all before anything expensive starts."""

from __future__ import annotations

import json

import pytest
import yaml

from rlpost.cli import main
from rlpost.config.load import dump_config
from rlpost.config.offline import DPOJobConfig, SFTJobConfig
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_offline_config
from tests.run_helpers import ROOT

DPO = ROOT / "tests" / "configs" / "dpo_tiny.yaml"
SFT = ROOT / "tests" / "configs" / "sft_tiny.yaml"


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(6)]
    rows.insert(3, {"prompt": "3+3=", "chosen": "6", "rejected": "6"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tiny_configs_load(pairs):
    dpo = load_offline_config(
        "dpo", DPO, [f"data.path={pairs}", "algorithm.loss=tdpo2", "algorithm.alpha=0.2"]
    )
    assert isinstance(dpo, DPOJobConfig) and dpo.algorithm_spec() == (
        "preference",
        {"loss": "tdpo2", "beta": 0.1, "alpha": 0.2},
    )
    sft = load_offline_config("sft", SFT, [f"data.path={pairs}", "algorithm.loss=asft"])
    assert isinstance(sft, SFTJobConfig) and sft.algorithm_spec() == ("sft", {"loss": "asft"})


def test_config_yaml_round_trip(tmp_path, pairs):
    """config.yaml has every key but only the algorithm keys that were set (as RL's
    `algorithm.*`): a loss rejects another loss's key even at its default value."""
    cfg = load_offline_config(
        "dpo", DPO, [f"data.path={pairs}", "algorithm.loss=sparsepo", "algorithm.lambda_u=0.1"]
    )
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    tree = yaml.safe_load(saved.read_text())
    assert tree["algorithm"] == {"loss": "sparsepo", "beta": 0.1, "lambda_u": 0.1}
    assert tree["learner"]["micro_batch_size"] == 4 and "mini_batch_size" not in tree["learner"]
    assert load_offline_config("dpo", saved) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "key 'data.path' is required"),
        (["data.path=/no/such.jsonl"], "key 'data.path': no such file or directory: /no/such.jsonl"),
        (["learner.mini_batch_size=8"], "unknown key 'learner.mini_batch_size'"),
        (["ray.placement=colocated"], "unknown key 'ray.placement'"),
        (["algorithm.alpha=0.3"], "algorithm.alpha is set but algorithm.loss is 'dpo'"),
        (["algorithm.loss=ipo"], "key 'algorithm.loss': Input should be 'dpo', 'tdpo1'"),
        (["algorithm.name=dpo"], "key 'algorithm.name': unknown algorithm 'dpo'; known: preference"),
        (["learner.num_learners=2"], "mode 'inprocess' runs one learner"),
        (["data.eval_fraction=1"], "key 'data.eval_fraction': Input should be less than 1"),
        (["model.kind=hf", "model.path=/no/model"], "key 'model.path': directory not found"),
    ],
)
def test_config_errors_name_the_key(pairs, overrides, message):
    if overrides and not overrides[0].startswith("data.path"):
        overrides = [f"data.path={pairs}", *overrides]
    with pytest.raises(ConfigError) as e:
        load_offline_config("dpo", DPO, overrides)
    assert str(e.value).startswith(f"{DPO}{' (with overrides)' if overrides else ''}: ")
    assert message in str(e.value)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_strict_stops_with_one_line_naming_file_and_row(tmp_path, pairs, capsys):
    out_dir = tmp_path / "runs"
    code, out, err = run_cli(
        capsys, "dpo", str(DPO), f"data.path={pairs}", "data.strict=true", f"output_dir={out_dir}"
    )
    assert code == 2 and out == ""
    assert err == f"rlpost: error: {pairs}: row 3: identical: chosen and rejected are identical\n"
    assert not out_dir.exists()  # nothing started


def test_data_errors_before_start_up(tmp_path, pairs, capsys):
    out_dir = tmp_path / "runs"
    code, _, err = run_cli(
        capsys, "dpo", str(DPO), f"data.path={pairs}", "algorithm.loss=cdpo", f"output_dir={out_dir}"
    )
    assert code == 2 and err.startswith(f"rlpost: error: {pairs}: 7 rows, 0 pairs kept, 7 skipped: ")
    assert "nothing to train on" in err and "no 'rejected_weights'" in err and err.count("\n") == 1
    code, _, err = run_cli(
        capsys, "dpo", str(DPO), f"data.path={pairs}", "batch_size=6", f"output_dir={out_dir}"
    )
    assert code == 2 and err == (
        f"rlpost: error: key 'batch_size': 6 is more than the 5 training pairs "
        f"of {pairs} (1 held out for evaluation)\n"
    )
    code, _, err = run_cli(capsys, "sft", str(SFT), f"data.path={pairs}", f"output_dir={out_dir}")
    assert code == 2 and "7 rows, 0 examples kept, 7 skipped: missing_field 7" in err
    assert not out_dir.exists()
