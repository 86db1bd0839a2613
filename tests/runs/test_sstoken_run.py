"""`rlpost sft` with `algorithm.name: sstoken` (EMA history model) on a tiny model, in this
process: the run reports the selection's metrics, its checkpoints hold the EMA, and a resume
from the middle checkpoint repeats the last step exactly (a restarted EMA would not: its
average after step 1 is not the resumed policy)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from rlpost.cli import main
from rlpost.errors import ConfigError
from rlpost.jobs.offline import SFTTrainer
from rlpost.jobs.preflight import load_offline_config
from rlpost.workers.learner import EMA_FILE
from tests.run_helpers import only_run_dir, read_metrics

CONFIG = """\
name: sstoken_tiny
seed: 3
mode: inprocess
batch_size: 4
steps: 2
save_every: 1
eval_every: 0
model: {kind: tiny, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}
data: {eval_fraction: 0.0}
algorithm: {name: sstoken, history_model: ema, ema_decay: 0.5}
learner: {num_learners: 1, zero_stage: 1, lr: 3.0e-2, micro_batch_size: 2}
tracking: {wandb: disabled}
"""


def run(config, data, out_dir, *overrides: str):
    assert main(["sft", str(config), f"data.path={data}", f"output_dir={out_dir}", *overrides]) == 0
    return only_run_dir(out_dir)


def test_sstoken_sft_runs_and_resumes_exactly(tmp_path):
    config, data = tmp_path / "sstoken.yaml", tmp_path / "sft.jsonl"
    config.write_text(CONFIG)
    rows = [
        {"prompt": f"{a}+{b}=", "completion": str(37 * a + 11 * b) * 2} for a in range(3) for b in range(3)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full_run = run(config, data, tmp_path / "full")
    full = read_metrics(full_run)
    for step in (1, 2):
        m = full[step]
        # completions of 3 to 7 tokens (with EOS): ceil(0.6 n) of n is 3/5 to 2/3, or 5/7
        assert 0.6 <= m["sstoken/selected_frac"] < 0.72 and 0 < m["sstoken/attn_mean"] < 1
        assert m["nll_selected"] == pytest.approx(m["loss"], rel=1e-9)
        assert math.isfinite(m["nll"]) and math.isfinite(m["sstoken/rel_mean"])
    assert full[1]["sstoken/rel_mean"] == 0.0 and full[2]["sstoken/rel_mean"] != 0.0  # the EMA moved
    assert (full_run / "checkpoints" / "step_1" / EMA_FILE).is_file()

    copy = tmp_path / "resumed" / full_run.name
    shutil.copytree(full_run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_2")
    shutil.rmtree(copy / "final_model")
    run(config, data, tmp_path / "resumed", f"resume={copy}")
    resumed = read_metrics(copy)
    for key, value in full[2].items():
        assert resumed[2][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_ema_under_zero3_is_refused_before_anything_starts(tmp_path):
    config, data = tmp_path / "sstoken.yaml", tmp_path / "sft.jsonl"
    config.write_text(CONFIG)
    data.write_text("".join(json.dumps({"prompt": f"{i}=", "completion": str(i)}) + "\n" for i in range(8)))
    cfg = load_offline_config("sft", config, [f"data.path={data}", "learner.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"key 'learner\.zero_stage'.*history_model: ema"):
        SFTTrainer(cfg)
