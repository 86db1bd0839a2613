"""RL prompts read from users' files: the verl / TRL / OpenRLHF conventions, bad rows, the
prompt-length limit, the Arrow cache, and the Problems a job reads."""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import random
from array import array
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rlpost.data.prompt_files as prompt_files
from rlpost.config.data import DataConfig
from rlpost.config.sections import TaskConfig
from rlpost.data.prompt_files import PromptDataset, resolve_files
from rlpost.data.prompts import encode_prompt
from rlpost.data.rows import PreferenceDataError
from rlpost.data.stream import EpochStream, derive_seed
from rlpost.errors import ConfigError
from tests.data.test_prompt_encoding import TEMPLATE, tokenizer


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(files, tmp_path, tok=None, task=None, **data) -> PromptDataset:
    files = files if isinstance(files, list) else [files]
    return PromptDataset.load(
        files, DataConfig(**data), tok or tokenizer(TEMPLATE), task or TaskConfig(), tmp_path / "cache"
    )


def verl_rows(n: int, source: str = "openai/gsm8k") -> list[dict]:
    return [
        {
            "data_source": source,
            "prompt": user(f"What is {i} + {i}?"),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
            "extra_info": {"split": "train", "index": i},
        }
        for i in range(n)
    ]


def test_verl_parquet_with_the_default_keys(tmp_path):
    path = tmp_path / "train.parquet"
    rows = verl_rows(3) + verl_rows(2, source="math500")
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = load(path, tmp_path)
    assert len(ds) == 5 and ds.sources == ["math500", "openai/gsm8k"]
    problem = ds[1]
    assert problem.prompt == user("What is 1 + 1?") and problem.answer == "2"
    assert problem.source == "openai/gsm8k"
    assert problem.meta == {"fields": rows[1], "file": str(path), "row": 1}
    assert problem.fields["extra_info"] == {"split": "train", "index": 1}
    assert ds[-1].source == "math500" and ds[4].meta["row"] == 4
    with pytest.raises(IndexError):
        ds[5]
    assert [r.summary() for r in ds.reports] == [f"{path}: 5 rows, 5 prompts kept"]
    assert [p.answer for p in ds] == ["0", "2", "4", "0", "2"]
    assert len(random.Random(0).sample(ds, 2)) == 2


def test_trl_jsonl_text_prompts_with_an_answer_column(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm8k.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    )
    ds = load(path, tmp_path, answer_key="answer")
    assert [(p.prompt, p.answer, p.source) for p in (ds[0], ds[1])] == [
        ("1+1=", "2", "gsm8k"),
        ("2+2=", "4", "gsm8k"),
    ]


def test_openrlhf_keys_and_a_default_source(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"input": "Say hi", "label": "hi"}])
    ds = load(path, tmp_path, prompt_key="input", answer_key="label", default_source="chat")
    assert (ds[0].prompt, ds[0].answer, ds[0].source, ds.sources) == ("Say hi", "hi", "chat", ["chat"])


def test_saved_datasets_and_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    Dataset.from_list(rows).save_to_disk(tmp_path / "single")
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(
        tmp_path / "both"
    )
    assert len(load(tmp_path / "single", tmp_path, answer_key="answer")) == 3
    assert len(load(tmp_path / "both", tmp_path, answer_key="answer")) == 3  # train by default
    test = load(tmp_path / "both", tmp_path, answer_key="answer", split="test")
    assert len(test) == 1 and test[0].source == "both"
    with pytest.raises(PreferenceDataError, match="no split 'dev'"):
        load(tmp_path / "both", tmp_path, answer_key="answer", split="dev")


def test_globs_and_lists_of_files(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        write_jsonl(tmp_path / name, [{"prompt": name, "answer": "x"}])
    (tmp_path / "notes.txt").write_text("")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert resolve_files(str(tmp_path / "*.jsonl"), "data.train_files") == [a, b]
    assert resolve_files([str(b), str(tmp_path / "?.jsonl")], "data.train_files") == [b, a]
    assert resolve_files(None, "data.eval_files") == []
    with pytest.raises(ConfigError, match=r"key 'data.train_files': no file matches 'x/\*.parquet'"):
        resolve_files("x/*.parquet", "data.train_files")
    with pytest.raises(ConfigError, match="key 'data.eval_files': no such file or directory: 'nope.jsonl'"):
        resolve_files(["nope.jsonl"], "data.eval_files")
    with pytest.raises(ConfigError, match="notes.txt: expected .jsonl, .parquet"):
        resolve_files(str(tmp_path / "*"), "data.train_files")
    ds = load(resolve_files(str(tmp_path / "*.jsonl"), "k"), tmp_path, answer_key="answer")
    assert [p.prompt for p in (ds[0], ds[1])] == ["a.jsonl", "b.jsonl"] and ds.sources == ["a", "b"]
    assert [p.meta["file"] for p in (ds[0], ds[1])] == [str(a), str(b)]


BAD_ROWS = [
    {"prompt": "ok", "answer": "1"},  # 0
    "{not json",  # 1 invalid_json
    "[1, 2]",  # 2 malformed: not an object
    {"answer": "1"},  # 3 missing_field
    {"prompt": "x", "answer": None},  # 4 missing_field
    {"prompt": [], "answer": "1"},  # 5 malformed
    {"prompt": [{"role": "user"}], "answer": "1"},  # 6 malformed
    {"prompt": "x", "answer": "1", "data_source": 3},  # 7 malformed
    {"prompt": "  \n", "answer": "1"},  # 8 empty_prompt
    {"prompt": user(" "), "answer": "1"},  # 9 empty_prompt
    {"prompt": "x", "answer": 42},  # 10 bad_answer
    {"prompt": "far too long", "answer": "1"},  # 11 too_long with max_prompt_length 8
    "",  # a blank line has no row number
    {"prompt": "hi", "answer": "2", "data_source": "s"},  # 12
]


def test_every_bad_row_is_reported_with_its_row_number(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    ds = load(path, tmp_path, tok=tokenizer(), answer_key="answer", max_prompt_length=8)
    (report,) = ds.reports
    assert report.skipped == {
        "invalid_json": [1],
        "missing_field": [3, 4],
        "malformed": [2, 5, 6, 7],
        "empty_prompt": [8, 9],
        "bad_answer": [10],
        "too_long": [11],
    }
    assert report.first["missing_field"] == "row 3: no 'prompt'"
    assert report.first["bad_answer"] == "row 10: 'answer' is int 42, not a string"
    assert report.first["too_long"] == "row 11: 13 tokens > max_prompt_length 8"
    assert report.summary() == (
        f"{path}: 13 rows, 2 prompts kept, 11 skipped: invalid_json 1 (row 1); "
        "missing_field 2 (rows 3, 4); malformed 4 (rows 2, 5, 6, 7); empty_prompt 2 (rows 8, 9); "
        "bad_answer 1 (row 10); too_long 1 (row 11)"
    )
    assert [ds[0].meta["row"], ds[1].meta["row"]] == [0, 12] and ds.sources == ["bad", "s"]


def test_a_missing_nested_answer_names_its_dotted_key(tmp_path):
    path = write_jsonl(
        tmp_path / "v.jsonl", [{"prompt": "x", "reward_model": {}}, {"prompt": "y", "reward_model": 3}]
    )
    with pytest.raises(
        PreferenceDataError, match=r"v.jsonl: no usable row; .* missing_field 2 \(rows 0, 1\)"
    ):
        load(path, tmp_path)
    with pytest.raises(PreferenceDataError) as e:
        load(path, tmp_path, strict=True)
    assert str(e.value) == f"{path}: row 0: missing_field: no 'reward_model.ground_truth'"


def test_strict_stops_at_the_first_bad_row_cached_or_not(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS[10:])
    kw = dict(tok=tokenizer(), answer_key="answer")
    expected = f"{path}: row 0: bad_answer: 'answer' is int 42, not a string"
    for _ in range(2):  # converting, then from the entry a lenient load cached
        with pytest.raises(PreferenceDataError) as e:
            load(path, tmp_path, strict=True, max_prompt_length=8, **kw)
        assert str(e.value) == expected
        load(path, tmp_path, max_prompt_length=8, **kw)
    # a too_long row before another bad row is the first, though tokenized in batches
    path = write_jsonl(tmp_path / "long.jsonl", BAD_ROWS[11:12] + BAD_ROWS[10:11])
    with pytest.raises(
        PreferenceDataError, match=r"long.jsonl: row 0: too_long: 13 tokens > max_prompt_length 8$"
    ):
        load(path, tmp_path, strict=True, max_prompt_length=8, **kw)


def test_too_long_counts_tokens_as_the_rollout_prompt_is_encoded(tmp_path):
    rows = [{"prompt": "abcde", "answer": "1"}, {"prompt": "abcdef", "answer": "1"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)

    def kept(tok, task, limit) -> list[int]:
        ds = load(path, tmp_path, tok=tok, task=task, answer_key="answer", max_prompt_length=limit)
        return [ds[i].meta["row"] for i in range(len(ds))]

    plain = TaskConfig()
    assert len(encode_prompt(tokenizer(), "abcde", plain)) == 6  # BOS + 5 characters
    assert kept(tokenizer(), plain, 6) == [0]
    assert kept(tokenizer(), plain, 7) == [0, 1]
    # "Sys.\n\n" adds 5 tokens: the char tokenizer's "." pattern leaves "\n\n" one (unknown) token
    assert len(encode_prompt(tokenizer(), "abcde", TaskConfig(system_prompt="Sys."))) == 11
    assert kept(tokenizer(), TaskConfig(system_prompt="Sys."), 11) == [0]
    # "<s>user:" 6 + 5 + "</s>" 1 + "<s>assistant:" 11: <s> and </s> are one token each
    assert len(encode_prompt(tokenizer(TEMPLATE), "abcde", plain)) == 23
    assert kept(tokenizer(TEMPLATE), plain, 23) == [0]
    with pytest.raises(PreferenceDataError, match="t.jsonl: no usable row"):
        kept(tokenizer(TEMPLATE), plain, 22)


def test_conversations_keep_their_own_system_message(tmp_path):
    system = [{"role": "system", "content": "Mine."}, *user("hi")]
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"prompt": user("hi"), "answer": "1"}, {"prompt": system, "answer": "1"}]
    )
    tok, task = tokenizer(TEMPLATE), TaskConfig(system_prompt="Run's.")
    # row 0: "<s>system:Run's.</s>" 15 + "<s>user:hi</s>" 9 + "<s>assistant:" 11 = 35 tokens;
    # row 1 has its own system message "Mine." (34)
    ds = load(path, tmp_path, tok=tok, task=task, answer_key="answer", max_prompt_length=35)
    assert [p.meta["row"] for p in (ds[0], ds[1])] == [0, 1]
    assert (
        tok.decode(encode_prompt(tok, ds[0].prompt, task))
        == "<s>system:Run's.</s><s>user:hi</s><s>assistant:"
    )
    assert (
        tok.decode(encode_prompt(tok, ds[1].prompt, task)) == "<s>system:Mine.</s><s>user:hi</s><s>assistant:"
    )
    short = load(path, tmp_path, tok=tok, task=task, answer_key="answer", max_prompt_length=34)
    assert len(short) == 1 and short[0].meta["row"] == 1
    with pytest.raises(PreferenceDataError, match=r"c.jsonl: row 0: .*the tokenizer has no chat template"):
        load(path, tmp_path, tok=tokenizer(), task=task, answer_key="answer")


def test_the_cache_is_read_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows(4)), path)
    first = load(path, tmp_path)
    (entry,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["prompts.arrow", "report.json"]

    def no_reading(*args):
        raise AssertionError("the source file was read again")

    monkeypatch.setattr(prompt_files, "read_rows", no_reading)
    again = load(path, tmp_path)
    assert [again[i] for i in range(4)] == [first[i] for i in range(4)]
    assert again.reports == first.reports
    # the limit is a key of the entry
    with pytest.raises(AssertionError, match="read again"):
        load(path, tmp_path, max_prompt_length=100)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    with pytest.raises(AssertionError, match="read again"):
        load(path, tmp_path)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no half-written entry is left
    monkeypatch.undo()
    assert len(load(path, tmp_path)) == 4


def test_the_tokenizer_is_part_of_the_key_only_with_a_limit(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "answer": "a"}])
    cfg, task = DataConfig(answer_key="answer"), TaskConfig()
    keys = {prompt_files.cache_key(path, cfg, tok, task) for tok in (tokenizer(), tokenizer(TEMPLATE))} | {
        prompt_files.cache_key(path, cfg, tokenizer(), TaskConfig(system_prompt="S"))
    }
    assert len(keys) == 1
    limited = DataConfig(answer_key="answer", max_prompt_length=10)
    keys = {prompt_files.cache_key(path, limited, tok, task) for tok in (tokenizer(), tokenizer(TEMPLATE))}
    assert len(keys) == 2


def test_fields_keep_values_json_cannot_write(tmp_path):
    path = tmp_path / "odd.parquet"
    when = dt.datetime(2024, 5, 1, 12, 0)
    table = pa.table(
        {"prompt": ["q"], "reward_model": [{"ground_truth": "a"}], "blob": [b"\x00\xff"], "when": [when]}
    )
    pq.write_table(table, path)
    fields = load(path, tmp_path)[0].fields
    assert fields["blob"] == "AP8=" and fields["when"] == "2024-05-01T12:00:00"


def test_a_dataset_pickles_as_its_cache_files(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows(3)), path)
    ds = load(path, tmp_path)
    copy = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 2000 and [copy[i] for i in range(3)] == [ds[i] for i in range(3)]


def test_the_epoch_order_is_compact_and_unchanged():
    stream = EpochStream(1000, seed=3)
    order = stream.order(2)
    expected = list(range(1000))
    random.Random(derive_seed(3, "epoch", 2)).shuffle(expected)
    assert isinstance(order, array) and order.itemsize == 4 and list(order) == expected
    assert stream.take(1001)[1000] == stream.order(1)[0]
