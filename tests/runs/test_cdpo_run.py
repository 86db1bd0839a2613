"""`rlpost cdpo` end to end through the CLI, at a size a CI machine runs in a few minutes:
every stage's artifact, the pairs' weights one per trained token, the token-weight view,
and reruns on the run directory that skip finished stages and redo changed ones."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rlpost.model.load import char_tokenizer
from rlpost.rewards.tasks.arithmetic import Arithmetic
from tests.run_helpers import ROOT, only_run_dir

pytestmark = pytest.mark.slow

SMALL = [
    "mode=inprocess",
    "task.args.digits=1",
    "task.train_size=256",
    "task.eval_size=32",
    "warmup.steps=150",
    "warmup.batch_size=32",
    "rollout.prompts_per_step=32",
    "cdpo.problems=64",
    "cdpo.contrast.batch_size=4",
    "cdpo.contrast.steps=3",
    "cdpo.dpo.batch_size=4",
    "cdpo.dpo.steps=3",
]


def cdpo(*overrides: str) -> str:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlpost.cli",
            "cdpo",
            str(ROOT / "configs" / "cdpo_quickstart.yaml"),
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def ran(out: str) -> list[str]:
    return [
        line.split()[1].rstrip(":")
        for line in out.splitlines()
        if line.startswith("[cdpo] ") and line.endswith(")") and ": started (" in line
    ]


def test_pipeline_then_reruns(tmp_path):
    out = cdpo(*SMALL, f"output_dir={tmp_path}")
    run = only_run_dir(tmp_path)
    assert ran(out) == ["start", "sample", "positive", "negative", "weights", "dpo", "baseline", "evaluate"]
    results = json.loads((run / "results.json").read_text())
    assert set(results["accuracy"]) == {"start", "cdpo", "dpo"}
    sample = results["sample"]
    assert sample["trajectories"] == 64 * 8 and 0 < sample["correct_fraction"] < 1 and sample["pairs"] > 0
    rows = [
        json.loads(line) for line in (run / "stages" / "sample" / "samples.jsonl").read_text().splitlines()
    ]
    empty = sum(not r["response"].strip() for r in rows)
    assert sample["empty_responses"] == empty
    negatives = (run / "stages" / "sample" / "negatives.jsonl").read_text().splitlines()
    assert len(negatives) == sum(not r["correct"] for r in rows) - empty
    stages = run / "stages"
    for stage in ("positive", "negative", "dpo", "baseline"):
        assert (stages / stage / "final_model" / "config.json").is_file()
        assert (stages / stage / "plots" / "metrics.png").is_file()
    # one weight in [0, 1] per token of the rejected response as `rlpost dpo` reads it (EOS included)
    tok = char_tokenizer(Arithmetic.alphabet)
    pairs = [json.loads(line) for line in (stages / "weights" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == sample["pairs"]
    for p in pairs:
        assert len(p["rejected_weights"]) == len(tok.encode(p["rejected"], add_special_tokens=False)) + 1
        assert all(0 <= w <= 1 for w in p["rejected_weights"])
    assert (stages / "weights" / "token_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pairs[0]["rejected"] in (stages / "weights" / "token_weights.html").read_text()
    # the DPO stage trained with the weights, the baseline without
    dpo_metrics = [json.loads(line) for line in (stages / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < dpo_metrics[1]["critical_weight/mean"] < 1
    assert "critical_weight/mean" not in (stages / "baseline" / "metrics.jsonl").read_text()
    lines = out.splitlines()
    assert lines[-5] == "held-out accuracy (greedy / sampled):" and lines[-1] == f"run directory: {run}"

    # again on the run directory: every stage is complete
    again = cdpo(f"resume={run}")
    assert ran(again) == [] and again.count("complete, skipped") == 8
    assert json.loads((run / "results.json").read_text())["accuracy"] == results["accuracy"]

    # a DPO key changes: the DPO stages and the evaluation run again, nothing before them
    changed = cdpo(f"resume={run}", "cdpo.dpo.algorithm.beta=0.5")
    assert ran(changed) == ["dpo", "baseline", "evaluate"]
    assert json.loads((stages / "dpo" / "inputs.json").read_text())["inputs"]["algorithm"]["beta"] == 0.5
