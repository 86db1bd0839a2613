"""Data files that are not what they claim are refused with one line naming the file (and
the row), in every loader; a prompt longer than the model can take is skipped and reported
(issue 22). The same refusals through the CLI: tests/config/test_bad_inputs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlpost.config.data import DataConfig
from rlpost.config.sections import TaskConfig
from rlpost.data.datasets import load_preference_pairs, load_sft_examples
from rlpost.data.prompt_files import PromptDataset
from rlpost.data.rows import PreferenceDataError, read_rows
from rlpost.model.load import load_tokenizer

ROWS = "".join(json.dumps({"prompt": f"{i}+1=", "solution": str(i + 1)}) + "\n" for i in range(4))


def bad_files(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a file, the start of its error after the path)."""
    (d / "not_utf8.jsonl").write_bytes(ROWS.encode() + b'{"prompt": "caf\xe9", "solution": "2"}\n')
    (d / "nested.jsonl").write_text(ROWS + "[" * 100_000 + "]" * 100_000 + "\n")
    (d / "nested_object.jsonl").write_text('{"a": ' * 50_000 + "1" + "}" * 50_000 + "\n")
    (d / "big_number.jsonl").write_text(
        ROWS + '{"prompt": "1+1=", "solution": "2", "n": ' + "7" * 5000 + "}\n"
    )
    (d / "corrupt.parquet").write_bytes(b"PAR1" + b"\x00\x01garbage" * 40 + b"PAR1")
    (d / "truncated.parquet").write_bytes(b"PAR1")
    (d / "not_a_dataset").mkdir()
    (d / "not_a_dataset" / "x.txt").write_text("x")
    return {
        "not_utf8": (d / "not_utf8.jsonl", ": row 4: not UTF-8 text (byte 0xe9 at column 15)"),
        "nested": (d / "nested.jsonl", ": row 4: JSON nested too deeply to read"),
        "nested_object": (d / "nested_object.jsonl", ": row 0: JSON nested too deeply to read"),
        "big_number": (d / "big_number.jsonl", ": row 4: Exceeds the limit (4300 digits)"),
        "corrupt": (d / "corrupt.parquet", ": not a readable Parquet file ("),
        "truncated": (d / "truncated.parquet", ": not a readable Parquet file ("),
        "not_a_dataset": (d / "not_a_dataset", ": not a directory written by datasets.save_to_disk ("),
    }


NAMES = ["not_utf8", "nested", "nested_object", "big_number", "corrupt", "truncated", "not_a_dataset"]


@pytest.mark.parametrize("name", NAMES)
def test_read_rows_refuses_in_one_line(tmp_path, name):
    path, expected = bad_files(tmp_path)[name]
    with pytest.raises(PreferenceDataError) as err:
        list(read_rows(path))
    message = str(err.value)
    assert message.startswith(f"{path}{expected}"), message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["not_utf8", "corrupt"])
def test_every_loader_refuses(tmp_path, model_dir, name):
    path, expected = bad_files(tmp_path)[name]
    tokenizer = load_tokenizer(model_dir)
    for load in (
        lambda: PromptDataset.load(
            [path], DataConfig(answer_key="solution"), tokenizer, TaskConfig(), tmp_path / "c"
        ),
        lambda: load_sft_examples(path, tokenizer),
        lambda: load_preference_pairs(path, tokenizer),
    ):
        with pytest.raises(PreferenceDataError, match="not (UTF-8 text|a readable Parquet)"):
            load()
    assert not list((tmp_path / "c").glob("*.tmp-*"))  # the refused conversion left nothing


def test_prompt_beyond_the_model_is_skipped_and_reported(tmp_path, model_dir):
    """With no data.max_prompt_length, a prompt that leaves the model (64 positions here) no
    position for a response is skipped as too_long, not run (the CLI: tests/runs/test_failed_run.py)."""
    path = tmp_path / "train.jsonl"
    huge = json.dumps({"prompt": "1+" * 500_000 + "1=", "solution": "2"})  # 1 MB
    edge = json.dumps({"prompt": "1" * 62, "solution": "2"})  # with BOS 63 tokens: one position left
    full = json.dumps({"prompt": "1" * 64, "solution": "2"})
    path.write_text("\n".join([huge, ROWS.strip(), edge, full]) + "\n")
    tokenizer = load_tokenizer(model_dir)
    ds = PromptDataset.load(
        [path], DataConfig(answer_key="solution"), tokenizer, TaskConfig(), tmp_path / "c"
    )
    (report,) = ds.reports
    assert report.skipped == {"too_long": [0, 6]}
    assert report.first["too_long"].startswith("row 0: 1000003 tokens >= the model's 64 positions")
    assert len(ds) == 5 and ds[-1].prompt == "1" * 62
    assert "too_long 2 (rows 0, 6)" in report.summary()
