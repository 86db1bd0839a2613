"""Preference pairs from JSONL, Parquet and HF dataset directories in TRL's conventions
(standard, conversational, implicit prompt): tokenization, and every kind of bad row
reported with its row number (or raised with strict=True)."""

from __future__ import annotations

import json
import re

import pytest

from rlpost.data.datasets import load_preference_pairs
from rlpost.data.rows import PreferenceDataError
from rlpost.model.load import char_tokenizer

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
BOS, EOS = 1, 2


@pytest.fixture
def tok():
    t = char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 []\n?+=.:")
    t.chat_template = TEMPLATE
    return t


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def test_standard_rows(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
            {"prompt": "sky? ", "chosen": "blue", "rejected": "green", "extra": 1},
        ],
    )
    pairs, report = load_preference_pairs(path, tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert [p.row for p in pairs] == [0, 1] and report.kept == 2 and not report.skipped
    first = pairs[0]
    assert first.prompt_ids == [BOS] + enc("2+2=")
    assert first.chosen_ids == enc("4") + [EOS] and first.rejected_ids == enc("5") + [EOS]
    second = pairs[1]
    assert second.prompt_ids + second.chosen_ids == [BOS] + enc("sky? blue") + [EOS]
    assert report.summary() == f"{path}: 2 rows, 2 pairs kept"


def test_conversational_rows(tmp_path, tok):
    prompt = [{"role": "system", "content": "be brief"}, user("2+2?")]
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"prompt": prompt, "chosen": [bot("4")], "rejected": [bot("5.")]}]
    )
    (pair,), report = load_preference_pairs(path, tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert pair.prompt_ids == enc("[system]be brief\n[user]2+2?\n[assistant]")
    assert pair.chosen_ids == enc("4\n") and pair.rejected_ids == enc("5.\n")
    whole = tok.apply_chat_template(prompt + [bot("4")], tokenize=False)
    assert pair.prompt_ids + pair.chosen_ids == enc(whole)
    assert not report.boundary_moved


def test_implicit_prompt_text_and_messages(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "i.jsonl",
        [
            {"chosen": "the sum is 4", "rejected": "the sum is 5"},
            {"chosen": [user("hi"), bot("hello")], "rejected": [user("hi"), bot("go away")]},
        ],
    )
    (text, chat), _ = load_preference_pairs(path, tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    # TRL's extract_prompt: the space before the divergence goes to the responses
    assert text.prompt_ids == [BOS] + enc("the sum is")
    assert text.chosen_ids == enc(" 4") + [EOS] and text.rejected_ids == enc(" 5") + [EOS]
    assert chat.prompt_ids == enc("[user]hi\n[assistant]")
    assert chat.chosen_ids == enc("hello\n") and chat.rejected_ids == enc("go away\n")


def test_parquet_and_hf_dataset_directories(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = [
        {"prompt": [user("a")], "chosen": [bot("b")], "rejected": [bot("c")]},
        {"prompt": [user("d")], "chosen": [bot("")], "rejected": [bot("f")]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    pairs, report = load_preference_pairs(tmp_path / "c.parquet", tok)
    assert [p.row for p in pairs] == [0] and report.skipped == {"empty_response": [1]}
    want = pairs[0]

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(
        str(tmp_path / "splits")
    )
    for path, split in (
        (tmp_path / "single", None),
        (tmp_path / "splits", None),
        (tmp_path / "splits", "test"),
    ):
        pairs, report = load_preference_pairs(path, tok, split=split)
        assert pairs[0] == want and report.rows == (1 if split == "test" else 2)
    with pytest.raises(PreferenceDataError, match="no split 'dev'; splits: train, test"):
        load_preference_pairs(tmp_path / "splits", tok, split="dev")


def test_bad_rows_are_reported_with_their_row_numbers(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "q", "chosen": "a", "rejected": "b"},  # 0 ok
            {"prompt": "q", "rejected": "b"},  # 1 missing chosen
            "{not json",  # 2
            "",  # blank lines are not rows
            {"prompt": "q", "chosen": "   ", "rejected": "b"},  # 3 empty chosen
            {"prompt": "q", "chosen": "same", "rejected": "same"},  # 4 identical
            {"prompt": "q", "chosen": "a" * 30, "rejected": "b"},  # 5 too long: 1 + 1 + 30 + 1 > 20
            {"prompt": "q", "chosen": 4, "rejected": "b"},  # 6 wrong type
            {"prompt": [user("q")], "chosen": "a", "rejected": "b"},  # 7 messages and text mixed
            {"prompt": "", "chosen": "a", "rejected": "b"},  # 8 empty prompt
            {"chosen": "abc", "rejected": "xyz"},  # 9 implicit, nothing shared
            {"prompt": None, "chosen": "a", "rejected": "b"},  # 10 null prompt
            {"prompt": "q", "chosen": [bot("a")], "rejected": [bot("")]},  # 11 mixed again
            {"prompt": [user("q")], "chosen": [bot("a")], "rejected": []},  # 12 empty rejected
            {"prompt": "q", "chosen": "c", "rejected": "d"},  # 13 ok
        ],
    )
    pairs, report = load_preference_pairs(path, tok, max_length=20)
    assert [p.row for p in pairs] == [0, 13]
    assert report.rows == 14 and report.kept == 2
    assert report.skipped == {
        "invalid_json": [2],
        "missing_field": [1, 10],
        "malformed": [6, 7, 11],
        "empty_prompt": [8, 9],
        "empty_response": [3, 12],
        "identical": [4],
        "too_long": [5],
    }
    assert report.summary(first=2) == (
        f"{path}: 14 rows, 2 pairs kept, 12 skipped: invalid_json 1 (row 2); missing_field 2 "
        "(rows 1, 10); malformed 3 (rows 6, 7, ...); empty_prompt 2 (rows 8, 9); empty_response 2 "
        "(rows 3, 12); identical 1 (row 4); too_long 1 (row 5)"
    )


def test_too_long_counts_prompt_and_the_longer_response(tmp_path, tok):
    path = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "ab", "chosen": "cd", "rejected": "efgh"}])
    # BOS + 2 + 4 + EOS = 8 tokens on the rejected side
    assert load_preference_pairs(path, tok, max_length=8)[1].kept == 1
    assert load_preference_pairs(path, tok, max_length=7)[1].skipped == {"too_long": [0]}


def test_strict_stops_at_the_first_bad_row(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "a", "rejected": "a"},
            {"prompt": "q"},
        ],
    )
    want = f"{path}: row 1: identical: chosen and rejected are identical"
    with pytest.raises(PreferenceDataError, match=re.escape(want)):
        load_preference_pairs(path, tok, strict=True)


def test_boundary_moved_when_the_template_renders_the_prompt_differently(tmp_path, tok):
    tok.chat_template = (
        "{% for m in messages %}[{{ 'bot' if m['role'] == 'assistant' else m['role'] }}]"
        "{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    path = write_jsonl(
        tmp_path / "m.jsonl", [{"prompt": [user("hi")], "chosen": [bot("x")], "rejected": [bot("y")]}]
    )
    (pair,), report = load_preference_pairs(path, tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert pair.prompt_ids == enc("[user]hi\n[")  # where "[assistant]" and "[bot]" part
    assert pair.chosen_ids == enc("bot]x\n") and pair.rejected_ids == enc("bot]y\n")
    assert report.boundary_moved == [0] and report.kept == 1
    assert report.summary().endswith("1 pairs kept; prompt/response boundary moved in 1 (row 0)")


def test_errors_that_are_not_about_a_row(tmp_path, tok):
    with pytest.raises(PreferenceDataError, match="no such file"):
        load_preference_pairs(tmp_path / "none.jsonl", tok)
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(PreferenceDataError, match="unsupported format"):
        load_preference_pairs(tmp_path / "p.csv", tok)
    tok.chat_template = None
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"prompt": [user("q")], "chosen": [bot("a")], "rejected": [bot("b")]}]
    )
    with pytest.raises(PreferenceDataError, match="need a tokenizer with a chat template"):
        load_preference_pairs(path, tok)
