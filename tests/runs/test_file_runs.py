"""RL on prompts read from files, through the CLI: per-source rewards and metrics, resume in
the middle of an epoch, and `rlpost eval` on the trained model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import ROOT, TINY, only_run_dir, read_metrics, run_train

SOURCES = ("add", "echo")


def exact_match(response: str, problem, digits: int = 0, **fields) -> float:
    """The `echo` source's reward: a user function that reads a field of the row."""
    assert fields["extra_info"]["digits"] == digits == 1  # the row's field, the config's kwarg
    return float(response.strip() == problem.answer)


def write_rows(path: Path, count: int, offset: int = 0) -> Path:
    """verl-like rows of two sources: 1-digit sums, and digits to repeat."""
    rows = []
    for i in range(offset, offset + count):
        a, b = i % 10, (i * 7 + 3) % 10
        if i % 2:
            rows.append(
                {"data_source": "add", "prompt": f"{a}+{b}=", "reward_model": {"ground_truth": str(a + b)}}
            )
        else:
            rows.append(
                {
                    "data_source": "echo",
                    "prompt": f"{a}{b}=",
                    "reward_model": {"ground_truth": f"{a}{b}"},
                    "extra_info": {"digits": 1},
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def file_overrides(tmp_path: Path) -> list[str]:
    train = write_rows(tmp_path / "train.jsonl", 12)
    test = write_rows(tmp_path / "test.jsonl", 6, offset=40)
    reward = {
        "components": [{"name": "math"}],
        "sources": {
            "echo": [
                {
                    "name": "function",
                    "args": {"path": "tests.runs.test_file_runs:exact_match", "kwargs": {"digits": 1}},
                }
            ]
        },
    }
    return [
        f"data.train_files={train}",
        f"data.eval_files={test}",
        f"reward={json.dumps(reward)}",
        "warmup.steps=0",
        "eval.n=3",
        "rollout.max_new_tokens=3",
    ]


def cli(*args: str, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlpost.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        **kwargs,
    )


def files_config(tmp_path: Path) -> Path:
    """tiny.yaml without its task and warm-up, which say the prompts are generated."""
    config = tmp_path / "tiny_files.yaml"
    lines = [line for line in TINY.read_text().splitlines() if not line.startswith(("task:", "warmup:"))]
    config.write_text("\n".join(lines) + "\n")
    return config


def run_file_job(tmp_path: Path, out: Path, *overrides: str) -> Path:
    return run_train(out, *file_overrides(tmp_path), *overrides, config=files_config(tmp_path))


def test_file_run_reports_every_source_and_resumes_mid_epoch(tmp_path):
    # 12 rows, 4 prompts a step: an epoch is 3 steps, so the checkpoint at step 4 is mid-epoch
    full = read_metrics(run_file_job(tmp_path, tmp_path / "full", "steps=6", "save_every=2"))
    logged = {key for step in range(1, 7) for key in full[step]}  # a step has the sources it drew
    for source in SOURCES:
        assert {f"accuracy/{source}", f"reward/{source}/mean"} <= logged
        assert f"eval/test/{source}/greedy" in full[0] and f"eval/test/{source}/pass@2" in full[0]
    assert {"reward/math", "reward/function", "accuracy/all"} <= logged

    short = run_file_job(tmp_path, tmp_path / "resumed", "steps=4", "save_every=2")
    state = json.loads((short / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["data_position"] == 16  # one epoch and a third
    run_train(tmp_path / "resumed", f"resume={short}", "steps=6")
    resumed = read_metrics(short)
    assert sorted(resumed) == sorted(full)
    for step in sorted(full):
        # the log-prob gaps are float noise (~1e-7): equal to 1e-6, not in their last digits
        # (one loaded CI-like run differed by 3e-8 at step 5)
        gaps = {k for k in full[step] if k.startswith("logprob_gap/")}
        for k in gaps:
            assert resumed[step][k] == pytest.approx(full[step][k], abs=1e-6), (step, k)
        assert {k: v for k, v in resumed[step].items() if k not in gaps} == pytest.approx(
            {k: v for k, v in full[step].items() if k not in gaps}
        ), step

    model = short / "final_model"
    proc = cli(
        "eval",
        str(short / "config.yaml"),
        f"model.path={model}",
        "resume=null",
        f"output_dir={tmp_path / 'eval'}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    eval_dir = only_run_dir(tmp_path / "eval")
    rows = [json.loads(line) for line in (eval_dir / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * (1 + 3)  # a greedy and 3 sampled completions per problem
    assert {r["source"] for r in rows} == set(SOURCES)
    metrics = read_metrics(eval_dir)[0]
    greedy = [r["correct"] for r in rows if r["mode"] == "greedy"]
    assert metrics["eval/accuracy_greedy"] == pytest.approx(sum(greedy) / 6)
    # the final model's evaluation at the end of training saw the same greedy completions
    assert metrics["eval/accuracy_greedy"] == pytest.approx(full[6]["eval/accuracy_greedy"])
    assert "pass@3" in (eval_dir / "eval" / "generations.txt").read_text()


def test_a_run_without_eval_files_trains_and_says_so(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", 8)
    proc = cli(
        "train",
        str(files_config(tmp_path)),
        f"data.train_files={train}",
        f"output_dir={tmp_path / 'out'}",
        "steps=1",
        "rollout.max_new_tokens=2",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no evaluation: set data.eval_files" in proc.stdout
    assert "data: " + str(train) + ": 8 rows, 8 prompts kept" in proc.stdout
    metrics = read_metrics(only_run_dir(tmp_path / "out"))
    assert sorted(metrics) == [1] and metrics[1]["accuracy/all"] >= 0


def test_bad_rows_are_reported_before_the_run_starts(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "1+1=", "reward_model": {"ground_truth": "2"}}\n{"prompt": "2+2="}\n')
    proc = cli(
        "train",
        str(files_config(tmp_path)),
        f"data.train_files={train}",
        "data.strict=true",
        f"output_dir={tmp_path}",
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{train}: row 1: missing_field" in proc.stderr

    train.write_text('{"prompt": "1+1=", "reward_model": {"ground_truth": "2"}, "data_source": "all"}\n')
    proc = cli(
        "train", files_config(tmp_path), f"data.train_files={train}", f"output_dir={tmp_path}", timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{train}: source 'all' would overwrite the metrics named after it" in proc.stderr


@pytest.mark.slow
def test_ray_run_on_files_then_eval_with_vllm(tmp_path):
    """Two GRPO steps on a file dataset on a local Ray cluster, then `rlpost eval` of the
    final model through a real vLLM engine."""
    pytest.importorskip("vllm")
    run = run_file_job(tmp_path, tmp_path / "run", "mode=ray", "steps=2", "eval_every=0")
    metrics = read_metrics(run)
    assert sorted(metrics) == [0, 1, 2] and "eval/test/add/pass@3" in metrics[2]
    proc = cli(
        "eval",
        str(run / "config.yaml"),
        f"model.path={run / 'final_model'}",
        "rollout.engine=vllm",
        f"output_dir={tmp_path / 'eval'}",
        timeout=900,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    eval_dir = only_run_dir(tmp_path / "eval")
    rows = [json.loads(line) for line in (eval_dir / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 4 and all(r["tokens"] <= 3 for r in rows)
    assert {"eval/test/add/greedy", "eval/test/echo/maj@3"} <= set(read_metrics(eval_dir)[0])
