"""Bad input through the real CLI: each is refused before start-up in one line on stderr
(`rlpost: error: ...`, naming the file and the row or key), exit code 2, no traceback, and
no run directory left behind (issue 22, "Bad input")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config
from tests.run_helpers import ROOT, TINY

FILES_CONFIG = """\
name: files
mode: inprocess
steps: 1
model: {kind: tiny, hidden_size: 64, num_layers: 1, num_heads: 2, intermediate_size: 128}
rollout: {engine: hf, num_workers: 1, prompts_per_step: 4, n: 4, max_new_tokens: 3}
learner: {num_learners: 1, lr: 1.0e-3, mini_batch_size: 8, micro_batch_size: 4}
data: {answer_key: solution}
"""
SFT = ROOT / "tests" / "configs" / "sft_tiny.yaml"
DPO = ROOT / "tests" / "configs" / "dpo_tiny.yaml"
GOOD_ROWS = "".join(json.dumps({"prompt": f"{i}+1=", "solution": str(i + 1)}) + "\n" for i in range(8))


def write_inputs(d: Path) -> None:
    (d / "empty.yaml").write_text("")
    (d / "blank.yaml").write_text("\n  \n# only a comment\n")
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 2)
    (d / "latin1.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    (d / "null.yaml").write_text("null\n")
    (d / "duplicate.yaml").write_text(TINY.read_text() + "seed: 4\n")
    (d / "nested_dup.yaml").write_text("name: x\nlearner: {lr: 1.0e-3, lr: 2.0e-3}\n")
    (d / "files.yaml").write_text(FILES_CONFIG)
    (d / "no_model").mkdir()
    (d / "config_only").mkdir()
    (d / "config_only" / "config.json").write_text('{"model_type": "llama"}')
    (d / "good.jsonl").write_text(GOOD_ROWS)
    (d / "not_utf8.jsonl").write_bytes(GOOD_ROWS.encode() + b'{"prompt": "\xff\xfe", "solution": "2"}\n')
    (d / "nested.jsonl").write_text(GOOD_ROWS + "[" * 100_000 + "]" * 100_000 + "\n")
    big = '{"prompt": "1+1=", "solution": "2", "n": ' + "9" * 5000 + "}\n"
    (d / "big_number.jsonl").write_text(big + GOOD_ROWS)
    (d / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 2 + b"PAR1")
    (d / "not_a_dataset").mkdir()
    (d / "not_a_dataset" / "notes.txt").write_text("hello")
    sft_rows = "".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8))
    (d / "sft_not_utf8.jsonl").write_bytes(sft_rows.encode() + b'{"prompt": "\xff", "completion": "2"}\n')


def cases(d: Path) -> dict[str, tuple[list[str], str]]:
    """label -> (the CLI's arguments, a text the error line must hold)."""
    files = ["train", str(d / "files.yaml")]
    train = ["train", str(TINY)]
    return {
        "empty": (["train", str(d / "empty.yaml")], "empty.yaml: the file is empty"),
        "blank": (["train", str(d / "blank.yaml")], "blank.yaml: the file holds no settings"),
        "binary": (["train", str(d / "binary.yaml")], "binary.yaml: not a text file"),
        "latin1": (["train", str(d / "latin1.yaml")], "latin1.yaml: not UTF-8 text"),
        "null": (["train", str(d / "null.yaml")], "null.yaml: the file holds no settings (YAML null)"),
        "duplicate": (
            ["train", str(d / "duplicate.yaml")],
            "duplicate.yaml: line 14: key 'seed' is given twice",
        ),
        "nested_duplicate": (["train", str(d / "nested_dup.yaml")], "line 2: key 'lr' is given twice"),
        "lr_inf": ([*train, "learner.lr=inf"], "key 'learner.lr': must be a finite number (got inf)"),
        "lr_nan": ([*train, "learner.lr=nan"], "key 'learner.lr'"),
        "timeout_inf": (
            [*train, "rollout.weight_sync.timeout_s=.inf"],
            "key 'rollout.weight_sync.timeout_s': must be a finite number",
        ),
        "reward_timeout_overflow": (
            [*train, "reward.timeout_s=1e999"],
            "key 'reward.timeout_s': must be a finite",
        ),
        "kl_coef_inf": ([*train, "algorithm.kl_coef=.inf"], "key 'algorithm.kl_coef': must be a finite"),
        "resources_inf": ([*train, "ray.learner_resources={a: .inf}"], "key 'ray.learner_resources.a'"),
        "reward_arg_inf": (
            [*train, "reward.components=[{name: task}, {name: code, weight: 0, args: {cpu_s: .inf}}]"],
            "key 'reward.components.1.args': arg 'cpu_s': Input should be a finite number",
        ),
        "sft_lr_inf": (
            ["sft", str(SFT), f"data.path={d / 'good.jsonl'}", "learner.lr=inf"],
            "key 'learner.lr'",
        ),
        "hf_no_model": (
            [*train, f"model.path={d / 'no_model'}"],
            "key 'model.path': " + str(d / "no_model") + " holds no Hugging Face model (no config.json)",
        ),
        "hf_no_weights": (
            [*train, f"model.path={d / 'config_only'}"],
            "holds no Hugging Face model (no weights",
        ),
        "code_without_tests": (
            [*train, "reward.components=[{name: code}]"],
            "key 'reward.components.0': the code reward runs a problem's tests, and task "
            "'arithmetic' has none",
        ),
        "train_not_utf8": (
            [*files, f"data.train_files={d / 'not_utf8.jsonl'}"],
            "not_utf8.jsonl: row 8: not UTF-8",
        ),
        "train_nested": (
            [*files, f"data.train_files={d / 'nested.jsonl'}"],
            "nested.jsonl: row 8: JSON nested too",
        ),
        "train_big_number": (
            [*files, f"data.train_files={d / 'big_number.jsonl'}"],
            "big_number.jsonl: row 0: Exceeds the limit (4300 digits)",
        ),
        "train_corrupt_parquet": (
            [*files, f"data.train_files={d / 'corrupt.parquet'}"],
            "corrupt.parquet: not a readable Parquet file",
        ),
        "train_not_a_dataset": (
            [*files, f"data.train_files={d / 'not_a_dataset'}"],
            "not_a_dataset: not a directory written by datasets.save_to_disk",
        ),
        "eval_corrupt_parquet": (
            [*files, f"data.train_files={d / 'good.jsonl'}", f"data.eval_files={d / 'corrupt.parquet'}"],
            "corrupt.parquet: not a readable Parquet file",
        ),
        "eval_command_not_a_dataset": (
            [
                "eval",
                str(d / "files.yaml"),
                f"data.train_files={d / 'good.jsonl'}",
                f"data.eval_files={d / 'not_a_dataset'}",
            ],
            "not_a_dataset: not a directory written by datasets.save_to_disk",
        ),
        "sft_not_utf8": (
            ["sft", str(SFT), f"data.path={d / 'sft_not_utf8.jsonl'}"],
            "sft_not_utf8.jsonl: row 8",
        ),
        "dpo_corrupt_parquet": (
            ["dpo", str(DPO), f"data.path={d / 'corrupt.parquet'}"],
            "corrupt.parquet: not a readable Parquet file",
        ),
    }


# read while the job starts (after the model is built): seconds each, so marked slow; the
# readers' refusals are tested in-process in tests/data/test_bad_data_files.py
DATA_CASES = ("train_", "eval_", "sft_not_utf8", "dpo_corrupt_parquet")


def run_cases(d: Path, labels: list[str]) -> dict[str, tuple[subprocess.CompletedProcess, Path, str]]:
    """The cases `labels` run through the CLI (a few at a time), each with its own output_dir."""
    env = {**os.environ, "RLPOST_THREADS": "1", "RLPOST_CACHE": str(d / "cache")}
    chosen = {label: case for label, case in cases(d).items() if label in labels}

    def run(item):
        label, (args, expected) = item
        out = d / "runs" / label
        out.mkdir(parents=True)
        proc = subprocess.run(
            [sys.executable, "-m", "rlpost.cli", *args, f"output_dir={out}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=300,
        )
        return label, (proc, out, expected)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, chosen.items()))


def check_refused(proc: subprocess.CompletedProcess, out: Path, expected: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("rlpost: error: ")
    assert expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert list(out.iterdir()) == []  # no run directory


ALL = list(cases(Path("/x")))
CONFIG_LABELS = [label for label in ALL if not label.startswith(DATA_CASES)]
DATA_LABELS = [label for label in ALL if label.startswith(DATA_CASES)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    write_inputs(d)
    return d


@pytest.fixture(scope="module")
def refused_configs(inputs):
    return run_cases(inputs, CONFIG_LABELS)


@pytest.fixture(scope="module")
def refused_sample(inputs):
    return run_cases(inputs, SAMPLE)


@pytest.fixture(scope="module")
def refused_data(inputs):
    return run_cases(inputs, DATA_LABELS)


# every config case runs in a subprocess under -m slow (a second or two of imports each);
# by default a sample of them does, and every one runs in-process through the same main()
SAMPLE = ["duplicate", "lr_inf", "hf_no_model"]


@pytest.mark.slow
@pytest.mark.parametrize("label", CONFIG_LABELS)
def test_config_refused_in_one_line(refused_configs, label):
    check_refused(*refused_configs[label])


@pytest.mark.parametrize("label", SAMPLE)
def test_config_sample_refused_in_one_line(refused_sample, label):
    check_refused(*refused_sample[label])


@pytest.mark.parametrize("label", CONFIG_LABELS)
def test_config_refused_in_process(inputs, tmp_path, capsys, label):
    from rlpost.cli import main

    args, expected = cases(inputs)[label]
    code = main([*args, f"output_dir={tmp_path}"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("rlpost: error: ") and expected in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("label", DATA_LABELS)
def test_data_file_refused_in_one_line(refused_data, inputs, label):
    check_refused(*refused_data[label])
    cache = inputs / "cache" / "prompts"  # a refused conversion leaves no entry behind
    assert not [p.name for p in (cache.iterdir() if cache.exists() else []) if ".tmp-" in p.name]


def test_bounds_that_mean_no_bound_take_inf_and_nothing_takes_nan():
    cfg = load_config(
        TINY, ["off_policy.correction=seq_mask", "off_policy.seq_high=.inf", "off_policy.tis_cap=.inf"]
    )
    assert cfg.off_policy.seq_high == float("inf") and cfg.off_policy.tis_cap == float("inf")
    with pytest.raises(ConfigError, match="key 'learner.lr': must be a finite number .*use null"):
        load_config(TINY, ["learner.lr=.inf"])
    with pytest.raises(ConfigError, match="off_policy.seq_high"):
        load_config(TINY, ["off_policy.seq_high=.nan"])
