"""Offline data: SFT examples in TRL's formats with bad rows reported, cDPO's critical
weights per rejected token, pair samples, and micro-batches that keep pairs whole."""

from __future__ import annotations

import random
import re

import pytest
import torch

from rlpost.algorithms.base import CHOSEN_SIDE, PAIR_INDEX, REWARD_WEIGHT
from rlpost.data.datasets import PreferencePair, load_preference_pairs, load_sft_examples
from rlpost.data.pairs import pair_samples, shard_pairs
from rlpost.data.rows import PreferenceDataError
from rlpost.data.stream import EpochStream
from tests.data.test_preference_data import BOS, EOS, bot, tok, user, write_jsonl  # noqa: F401 (tok: fixture)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ----- SFT examples -----------------------------------------------------------------------


def test_sft_prompt_completion_and_messages(tmp_path, tok):
    conversation = [
        {"role": "system", "content": "be brief"},
        user("2+2?"),
        bot("4"),
        user("and 3+3?"),
        bot("6."),
    ]
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "2+2=", "completion": "4"},
            {"prompt": [user("hi")], "completion": [bot("yo")]},
            {"messages": conversation},
        ],
    )
    examples, report = load_sft_examples(path, tok)
    assert [e.row for e in examples] == [0, 1, 2] and report.summary() == f"{path}: 3 rows, 3 examples kept"
    text, chat, multi = examples
    assert text.prompt_ids == [BOS] + enc(tok, "2+2=") and text.completion_ids == enc(tok, "4") + [EOS]
    assert chat.prompt_ids == enc(tok, "[user]hi\n[assistant]") and chat.completion_ids == enc(tok, "yo\n")
    # the last reply is the response; the earlier turns, the assistant's "4" included, are prompt
    assert multi.prompt_ids == enc(
        tok, "[system]be brief\n[user]2+2?\n[assistant]4\n[user]and 3+3?\n[assistant]"
    )
    assert multi.completion_ids == enc(tok, "6.\n")


def test_sft_bad_rows_are_reported_with_their_row_numbers(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "q", "completion": "a"},  # 0 ok
            {"prompt": "q"},  # 1 no completion
            "[1, 2",  # 2
            {"messages": [user("q"), user("again")]},  # 3 does not end with a reply
            {"messages": [bot("a")]},  # 4 a reply with no prompt
            {"prompt": "q", "completion": " "},  # 5 empty completion
            {"prompt": "q", "completion": "a" * 30},  # 6 too long
            {"prompt": [user("q")], "completion": "a"},  # 7 mixed
            {"messages": None},  # 8
            ["prompt", "completion"],  # 9 not an object
        ],
    )
    examples, report = load_sft_examples(path, tok, max_length=20)
    assert [e.row for e in examples] == [0]
    assert report.skipped == {
        "invalid_json": [2],
        "missing_field": [1, 8],
        "malformed": [3, 7, 9],
        "empty_prompt": [4],
        "empty_response": [5],
        "too_long": [6],
    }
    assert report.first["malformed"] == (
        "row 3: the last message is from 'user'; it must be the assistant's reply"
    )
    assert report.summary().startswith(f"{path}: 10 rows, 1 examples kept, 9 skipped: invalid_json 1 (row 2)")
    with pytest.raises(
        PreferenceDataError, match=re.escape(f"{path}: row 1: missing_field: no 'completion'")
    ):
        load_sft_examples(path, tok, strict=True)


def test_sft_from_parquet(tmp_path, tok):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1=", "completion": "2"}]), tmp_path / "s.parquet")
    (example,), _ = load_sft_examples(tmp_path / "s.parquet", tok)
    assert example.prompt_ids + example.completion_ids == [BOS] + enc(tok, "1+1=2") + [EOS]


# ----- cDPO's critical weights -------------------------------------------------------------


def test_rejected_weights_one_per_rejected_token(tmp_path, tok):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "bc", "rejected_weights": [0.5, 1, 0.25]},  # b, c, EOS
        {"prompt": "q", "chosen": "a", "rejected": "bc", "rejected_weights": [0.5, 1]},  # 1 short
        {"prompt": "q", "chosen": "a", "rejected": "bc"},  # 2 none
        {"prompt": "q", "chosen": "a", "rejected": "b", "rejected_weights": [-0.1, 1]},  # 3 negative
        {"prompt": "q", "chosen": "a", "rejected": "b", "rejected_weights": [True, 1]},  # 4 not a number
        {"prompt": "q", "chosen": "a", "rejected": "b", "rejected_weights": "0.5 1"},  # 5 not a list
    ]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    pairs, report = load_preference_pairs(path, tok, rejected_weights=True)
    assert [p.row for p in pairs] == [0] and pairs[0].rejected_weights == [0.5, 1.0, 0.25]
    assert report.skipped == {"missing_field": [2], "bad_weights": [1, 3, 4, 5]}
    assert report.first["bad_weights"] == (
        "row 1: rejected_weights has 2 values; the rejected response has 3 tokens"
    )
    strict_error = "n.jsonl: row 0: bad_weights: rejected_weights[0] = -0.1 is not a finite number >= 0"
    with pytest.raises(PreferenceDataError, match=re.escape(strict_error)):
        load_preference_pairs(
            write_jsonl(tmp_path / "n.jsonl", rows[3:]), tok, rejected_weights=True, strict=True
        )
    # other losses do not read the field
    pairs, report = load_preference_pairs(path, tok)
    assert report.kept == 6 and all(p.rejected_weights is None for p in pairs)


def test_pair_samples_carry_pair_side_and_weights():
    pair = PreferencePair(7, [1, 5], [6, 7, 2], [8, 2], rejected_weights=[0.25, 0.75])
    ((w, r),) = pair_samples([pair], critical_weights=True)
    assert w.prompt_ids == r.prompt_ids == [1, 5] and w.response_ids == [6, 7, 2] and r.response_ids == [8, 2]
    assert w.extra[PAIR_INDEX].tolist() == [0, 0, 0] and r.extra[PAIR_INDEX].tolist() == [0, 0]
    assert w.extra[CHOSEN_SIDE].tolist() == [True] * 3 and r.extra[CHOSEN_SIDE].tolist() == [False] * 2
    assert w.extra[REWARD_WEIGHT].tolist() == [1.0] * 3 and r.extra[REWARD_WEIGHT].tolist() == [0.25, 0.75]
    assert REWARD_WEIGHT not in pair_samples([pair])[0][0].extra


# ----- pair-atomic micro-batches -----------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize(
    "ranks, max_tokens, max_seqs", [(1, 64, None), (2, 40, None), (3, None, 4), (2, 30, 3), (1, 10, None)]
)
def test_shard_pairs_keeps_pairs_whole_within_the_budgets(packed, ranks, max_tokens, max_seqs):
    rng = random.Random(ranks * 100 + (max_tokens or 0))
    pairs = [
        PreferencePair(i, [1] * rng.randint(1, 8), [3] * rng.randint(1, 12), [4] * rng.randint(1, 12))
        for i in range(11)
    ]
    samples = pair_samples(pairs)
    parts = shard_pairs(samples, ranks, max_tokens, max_seqs, packed)
    assert len(parts) == ranks and len({len(rank) for rank in parts}) == 1  # ranks step together
    seen = []
    for rank in parts:
        for micro in rank:
            index = [int(s.extra[PAIR_INDEX][0]) for s in micro]
            # both sides of each pair, next to each other
            assert index[::2] == index[1::2] and all(s.extra[CHOSEN_SIDE][0] for s in micro[::2])
            lengths = [len(s.prompt_ids) + s.num_tokens for s in micro]
            cost = sum(lengths) if packed else max(lengths, default=0) * len(micro)
            if len(micro) > 2:  # a single pair over the budget goes alone
                assert max_tokens is None or cost <= max_tokens
                assert max_seqs is None or len(micro) <= max(2, max_seqs)
            seen += index[::2]
    assert sorted(seen) == list(range(11))


def test_epoch_stream_crosses_epochs_in_seeded_orders():
    stream = EpochStream(5, seed=1)
    first = stream.take(3) + stream.take(4)
    assert sorted(first[:5]) == list(range(5)) and stream.position == 7
    again = EpochStream(5, seed=1)
    again.position = 3
    assert again.take(4) == first[3:]  # a resumed stream goes on where it stopped
    assert EpochStream(5, seed=2).take(5) != first[:5]
    assert torch.tensor(first[5:]).unique().numel() == 2
