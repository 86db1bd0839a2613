"""`rlpost sft` then `rlpost dpo` end to end through the CLI on a tiny model: the run
directory, the bad-row report, an RL config starting from the SFT model, resume, and the
same metrics on 2 Ray learners as on 1 in-process learner."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from tests.run_helpers import ROOT, only_run_dir, read_metrics, run_train

pytestmark = pytest.mark.slow

CONFIGS = ROOT / "tests" / "configs"


def write_data(tmp_path):
    """Addition with one digit: SFT demonstrations, and pairs preferring the right sum to
    one that is off by one, with critical weights on the rejected tokens (the digits that
    differ weigh 1, the EOS 0.1). Rows 40 and 41 of the pairs are bad."""
    rng = random.Random(0)
    sft, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    sft_rows, pair_rows = [], []
    for _ in range(40):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = str(a + b + rng.choice((-1, 1)))
        sft_rows.append(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}))
        pair_rows.append(
            json.dumps(
                {
                    "prompt": f"{a}+{b}=",
                    "chosen": str(a + b),
                    "rejected": wrong,
                    "rejected_weights": [1.0] * len(wrong) + [0.1],
                }
            )
        )
    pair_rows += [json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "2"}), "{oops"]
    sft.write_text("\n".join(sft_rows) + "\n")
    pairs.write_text("\n".join(pair_rows) + "\n")
    return sft, pairs


def run_job(job: str, out_dir, *overrides, config=None) -> tuple[str, object]:
    config = config or CONFIGS / f"{job}_tiny.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "rlpost.cli", job, str(config), f"output_dir={out_dir}", *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, only_run_dir(out_dir)


def assert_run_directory(run, steps: int):
    assert (run / "config.yaml").is_file() and (run / "data_report.json").is_file()
    assert (run / "plots" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "final_model" / "config.json").is_file()
    assert (run / "final_model" / "tokenizer_config.json").is_file()
    state = json.loads((run / "checkpoints" / f"step_{steps}" / "trainer_state.json").read_text())
    assert state["step"] == steps and state["data_position"] == steps * 8
    assert sorted(read_metrics(run)) == list(range(steps + 1))


def test_sft_then_dpo_from_its_model(tmp_path):
    sft_data, pair_data = write_data(tmp_path)
    out, sft_run = run_job("sft", tmp_path / "sft", f"data.path={sft_data}")
    lines = out.splitlines()
    assert lines[0] == f"data: {sft_data}: 40 rows, 40 examples kept; 32 train, 8 held out"
    assert lines[-3].startswith("held-out nll: ")
    assert_run_directory(sft_run, steps=8)  # 2 epochs of 32 examples, 8 per step
    metrics = read_metrics(sft_run)
    assert metrics[8]["eval/nll"] < metrics[0]["eval/nll"] - 0.5
    final = sft_run / "final_model"
    assert lines[-1] == f"run directory: {sft_run}"
    # an RL job starts from it
    rl_run = run_train(tmp_path / "rl", "model.kind=hf", f"model.path={final}", "steps=1", "warmup.steps=0")
    assert sorted(read_metrics(rl_run)) == [0, 1]

    out, dpo_run = run_job(
        "dpo",
        tmp_path / "dpo",
        f"data.path={pair_data}",
        "model.kind=hf",
        f"model.path={final}",
        "algorithm.loss=cdpo",
    )
    assert out.splitlines()[0] == (
        f"data: {pair_data}: 42 rows, 40 pairs kept, 2 skipped: "
        f"invalid_json 1 (row 41); identical 1 (row 40); 32 train, 8 held out"
    )
    assert json.loads((dpo_run / "data_report.json").read_text())["skipped"] == {
        "invalid_json": [41],
        "identical": [40],
    }
    assert_run_directory(dpo_run, steps=8)
    metrics = read_metrics(dpo_run)
    assert metrics[0]["eval/rewards/accuracy"] == 0.0  # policy == reference: no margin yet
    assert 0.1 < metrics[8]["critical_weight/mean"] < 1.0  # digits 1, EOS 0.1
    assert metrics[8]["eval/rewards/margin"] > 0
    assert not (dpo_run / "models" / "initial").exists()  # an hf model is used where it is


def test_resumed_dpo_run_repeats_the_uninterrupted_one(tmp_path):
    _, pair_data = write_data(tmp_path)
    common = [f"data.path={pair_data}", "algorithm.loss=tdpo2", "algorithm.alpha=0.5", "save_every=2"]
    _, full = run_job("dpo", tmp_path / "full", *common, "steps=4")
    _, part = run_job("dpo", tmp_path / "part", *common, "steps=2")
    out, resumed = run_job("dpo", tmp_path / "part", f"resume={part}", "steps=4")
    assert resumed == part and f"resumed {part} after step 2" in out
    a, b = read_metrics(full), read_metrics(resumed)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]
    for step in a:
        assert set(a[step]) == set(b[step]), step
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)


def test_two_ray_learners_match_one_in_process(tmp_path):
    _, pair_data = write_data(tmp_path)
    common = [f"data.path={pair_data}", "algorithm.loss=sparsepo", "steps=2", "learner.packing=packed"]
    _, local = run_job("dpo", tmp_path / "local", *common)
    _, on_ray = run_job("dpo", tmp_path / "ray", *common, "mode=ray", "learner.num_learners=2")
    a, b = read_metrics(local), read_metrics(on_ray)
    assert "mask_u/mean" in a[2] and "eval/kl/per_token" in a[2]
    for step in a:
        assert set(a[step]) == set(b[step]), step
        for key, value in a[step].items():  # gloo sums the ranks' gradients in another order
            assert b[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
