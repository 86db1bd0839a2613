"""`rlpost report` on a sweep directory of synthetic metric files: the table's numbers
against hand-computed means and sample standard deviations, and the plots as images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

from rlpost.cli import main
from rlpost.sweeps.manifest import DONE, run_output_dir, write_manifest
from rlpost.sweeps.report import curve, load_runs
from rlpost.sweeps.sweep import load_sweep
from tests.run_helpers import TINY

SWEEP = f"""
name: synthetic
base: {TINY}
seeds: [0, 1, 2]
arms:
  a: {{learner.lr: 1.0e-4}}
  b: {{learner.lr: 1.0e-3}}
"""


def rows_for(seed: int, arm: str) -> list[dict]:
    """12 RL steps. Arm a, seeds 0/1/2: greedy acc 0.2/0.4/0.6 before and 0.5/0.7/0.9 after,
    sampled 0.3; reward base+step/100 with base 0.1/0.2/0.3; rollout entropy 1/2/4;
    length 4; clip_frac_low 0.001*seed. Arm b (one seed): before 0.5, after 0.75."""
    base, k = [0.1, 0.2, 0.3][seed], seed
    rows = [
        {
            "step": 0,
            "time": 0.0,
            "eval/accuracy_greedy": [0.2, 0.4, 0.6][k] if arm == "a" else 0.5,
            "eval/accuracy_sampled": 0.25,
        }
    ]
    for step in range(1, 13):
        row = {
            "step": step,
            "time": float(step),
            "reward/mean": base + step / 100,
            "rollout_entropy": [1.0, 2.0, 4.0][k],
            "response_length/mean": 4.0,
            "clip_frac_low": 0.001 * k,
        }
        if step == 12:
            row["eval/accuracy_greedy"] = [0.5, 0.7, 0.9][k] if arm == "a" else 0.75
            row["eval/accuracy_sampled"] = 0.3
        rows.append(row)
    return rows


def make_sweep_dir(tmp_path, text: str = SWEEP, b_seeds=(0,)):
    path = tmp_path / "synthetic.yaml"
    path.write_text(text)
    sweep = load_sweep(path, output_dir=str(tmp_path / "sweeps"))
    write_manifest(sweep)
    for run in sweep.runs:
        if run.arm == "b" and run.seed not in b_seeds:
            continue  # not finished
        run_dir = run_output_dir(sweep.directory, run.id) / "run-20261122-000000"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows_for(run.seed, run.arm))
        )
        (run_dir.parent / DONE).write_text(
            json.dumps({"run_dir": str(run_dir.relative_to(sweep.directory)), "seconds": 1.0})
        )
    return sweep.directory


@pytest.fixture
def sweep_dir(tmp_path):
    return make_sweep_dir(tmp_path)


def table_rows(report: str) -> dict[str, dict[str, str]]:
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "arm":  # the second table (arm | overrides) starts
            break
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_report_table_numbers(sweep_dir, capsys):
    assert main(["report", str(sweep_dir)]) == 0
    report_md = sweep_dir / "report" / "report.md"
    assert capsys.readouterr().out.strip() == f"report: {report_md}"
    report = report_md.read_text()
    assert "4 of 6 runs finished (not finished: b-seed1, b-seed2)." in report
    rows = table_rows(report)
    a, b = rows["a"], rows["b"]
    assert a["seeds"] == "0,1,2" and b["seeds"] == "0"
    # a: mean and sample std (n - 1) over the three seeds
    assert a["greedy acc. before"] == "0.400 ± 0.200"
    assert a["greedy acc. after"] == "0.700 ± 0.200"
    assert a["sampled acc. after"] == "0.300 ± 0.000"
    # last 10 steps are steps 3..12: base + 0.075 -> 0.175, 0.275, 0.375
    assert a["reward (last 10 steps)"] == "0.275 ± 0.100"
    # 1, 2, 4: mean 7/3, std sqrt(((4/3)^2 + (1/3)^2 + (5/3)^2) / 2) = sqrt(7/3) = 1.5275
    assert a["entropy (last 10 steps)"] == "2.333 ± 1.528"
    assert a["response length (last 10 steps)"] == "4.000 ± 0.000"
    assert a["clip frac. low (run mean)"] == "0.0010 ± 0.0010"
    # b has one finished seed: a value without a spread
    assert b["greedy acc. before"] == "0.500" and b["greedy acc. after"] == "0.750"
    assert b["reward (last 10 steps)"] == "0.175"
    assert "clip frac. high (run mean)" not in a  # no run logged it: no column
    assert "| a | `learner.lr=0.0001` |" in report


def test_report_plots_are_images_with_a_band(sweep_dir):
    main(["report", str(sweep_dir)])
    report = (sweep_dir / "report" / "report.md").read_text()
    for stem in ("reward", "accuracy", "entropy", "response_length", "clip_frac_low"):
        path = sweep_dir / "report" / f"{stem}.png"
        assert f"]({stem}.png)" in report
        image = imread(path)
        assert image.shape == (500, 800, 4), stem  # 8 x 5 inches at 100 dpi, RGBA
        assert np.std(image[..., :3]) > 0.05, stem  # drawn on, not blank
    assert not (sweep_dir / "report" / "clip_frac_high.png").exists()

    _, runs, missing = load_runs(sweep_dir)
    assert missing == ["b-seed1", "b-seed2"]
    steps, mean, std = curve([r for r in runs if r.arm == "a"], "reward/mean")
    assert steps == list(range(1, 13))
    assert mean[0] == pytest.approx(0.21) and std[0] == pytest.approx(0.1)
    steps, mean, std = curve([r for r in runs if r.arm == "a"], "eval/accuracy_greedy")
    assert steps == [0, 12] and mean == pytest.approx([0.4, 0.7]) and std == pytest.approx([0.2, 0.2])


def test_report_compares_each_arm_with_its_baseline_seed_by_seed(tmp_path):
    # b's seeds 0 and 2 finished: greedy after 0.75 against a's 0.5 and 0.9 -> +0.25, -0.15
    d = make_sweep_dir(tmp_path, SWEEP + "baseline: a\n", b_seeds=(0, 2))
    main(["report", str(d)])
    report = (d / "report" / "report.md").read_text()
    section = report.split("## Against the baseline")[1].split("## Curves")[0]
    row = next(line for line in section.splitlines() if line.startswith("| b |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # mean of (+0.25, -0.15) = +0.05, sample std = 0.4 / sqrt(2) = 0.283; 1 of 2 seeds above
    assert cells[:3] == ["b", "a", "+0.050 ± 0.283 (1/2)"]
    assert cells[3] == "+0.000 ± 0.000 (0/2)"  # sampled accuracy 0.3 in every run
    # reward: b seed 2 has base 0.3 like a seed 2 (rows depend on the seed only)
    assert cells[4] == "+0.000 ± 0.000 (0/2)"
    assert "\n| a |" not in section  # the baseline is not compared with itself


def test_length_by_outcome_plot(tmp_path):
    d = make_sweep_dir(tmp_path)
    for metrics in (d / "runs").glob("*/*/metrics.jsonl"):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        for r in rows[1:]:
            r["response_length/correct"], r["response_length/incorrect"] = 40.0, 60.0 + r["step"]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["report", str(d)])
    report = (d / "report" / "report.md").read_text()
    assert "](length_by_outcome.png)" in report
    assert np.std(imread(d / "report" / "length_by_outcome.png")[..., :3]) > 0.05
    rows = table_rows(report)
    assert rows["a"]["length, correct (run mean)"] == "40.0 ± 0.0"
    assert rows["a"]["length, incorrect (run mean)"] == "66.5 ± 0.0"  # 60 + mean(1..12)
