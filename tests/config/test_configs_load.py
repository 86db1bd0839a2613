"""Every YAML file under configs/ is a valid config as it stands, and each ablation
family differs from its baseline only where it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlpost.algorithms import build_algorithm
from rlpost.jobs.preflight import load_cdpo_config, load_config, load_offline_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MAKE_DATA = CONFIGS.parent / "docs" / "own_data" / "make_data.py"
# training configs; configs/sweeps/ holds sweep files (tests/test_sweep.py loads those)
ALL = sorted(p for p in CONFIGS.rglob("*.yaml") if "sweeps" not in p.relative_to(CONFIGS).parts)


def test_there_are_configs():
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL}
    for family in (
        "aggregation_token_mean",
        "aggregation_seq_mean",
        "aggregation_balanced",
        "clipping_symmetric",
        "clipping_clip_higher",
        "clipping_hapo",
        "hapo_full",
        "hapo_no_temperature",
        "hapo_no_clip",
        "hapo_no_redistribution",
        "selection_none",
        "selection_d3s",
        "selection_entropy_mask",
        "selection_tw_grpo",
    ):
        assert f"ablations/{family}.yaml" in names
    assert {"quickstart.yaml", "dapo.yaml", "hapo.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_loads_and_builds_its_algorithm(path, tmp_path):
    tree = yaml.safe_load(path.read_text())
    if "cdpo" in tree:  # an `rlpost cdpo` pipeline
        load_cdpo_config(path)  # builds and validates each of its stages' configs
        return
    if "seed_methods" in path.parts:  # an `rlpost sft` config; its data comes from a script
        data = tmp_path / "data.jsonl"
        data.write_text('{"prompt": "1+2=", "completion": "3"}\n')
        cfg = load_offline_config("sft", path, [f"data.path={data}"])
        build_algorithm(*cfg.algorithm_spec())
        return
    overrides = []
    if "data" in tree:  # its files are made by the script its header names
        subprocess.run(
            [sys.executable, str(MAKE_DATA), tmp_path, "--train", "20", "--test", "10"], check=True
        )
        overrides = [
            f"data.train_files={tmp_path / 'train.jsonl'}",
            f"data.eval_files={tmp_path / 'test.jsonl'}",
        ]
    cfg = load_config(path, overrides)
    build_algorithm(cfg.algorithm.name, cfg.algorithm.params())


def _without(path: Path, *sections: str) -> dict:
    dumped = load_config(path).model_dump()
    return {k: v for k, v in dumped.items() if k not in ("name", *sections)}


@pytest.mark.parametrize("path", sorted((CONFIGS / "ablations").glob("*.yaml")), ids=lambda p: p.stem)
def test_ablations_are_the_quickstart_job_otherwise(path):
    quickstart = _without(CONFIGS / "quickstart.yaml", "algorithm", "rollout")
    assert _without(path, "algorithm", "rollout") == quickstart
    rollout = load_config(path).rollout.model_dump()
    base = load_config(CONFIGS / "quickstart.yaml").rollout.model_dump()
    assert {k: v for k, v in rollout.items() if k not in ("dynamic_sampling", "max_extra_rounds")} == {
        k: v for k, v in base.items() if k not in ("dynamic_sampling", "max_extra_rounds")
    }
