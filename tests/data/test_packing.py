"""Micro-batch planning and packed collation."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from rlpost.data.batch import TOKEN_FIELDS, Sample, Shard, collate, plan, repeat, shard


def test_plan_hand_example():
    lengths = [5, 9, 3, 7, 2, 6]
    # longest first, each to the lighter rank: r0 = 9, 5, 2 (16); r1 = 7, 6, 3 (16)
    # packed, budget 10, first fit: r0 -> [9], [5, 2]; r1 -> [7, 3], [6]
    assert plan(lengths, 2, max_tokens=10) == [[[1], [0, 4]], [[3, 2], [5]]]
    # padded, budget 12 (longest x count): r0 -> [9], [5, 2]; r1 -> [7], [6, 3]
    assert plan(lengths, 2, max_tokens=12, packed=False) == [[[1], [0, 4]], [[3], [5, 2]]]
    # a sequence over the budget gets its own micro-batch; ranks are padded with empty ones
    assert plan([20, 1, 1], 2, max_tokens=4) == [[[0]], [[1, 2]]]
    assert plan([3, 3, 3], 2, max_seqs=1) == [[[0], [2]], [[1], []]]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("packed", [True, False])
def test_plan_properties(seed, packed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(5, 40), rng.randint(100, 400)]) for _ in range(rng.randint(1, 60))]
    ranks, budget, cap = rng.randint(1, 4), rng.randint(64, 1024), rng.choice([None, 3])
    out = plan(lengths, ranks, max_tokens=budget, max_seqs=cap, packed=packed)
    assert len(out) == ranks and len({len(r) for r in out}) == 1
    flat = sorted(i for r in out for m in r for i in m)
    assert flat == list(range(len(lengths)))  # each sequence exactly once
    for r in out:
        for m in r:
            cost = sum(lengths[i] for i in m) if packed else max(lengths[i] for i in m) * len(m) if m else 0
            assert len(m) <= 1 or cost <= budget
            assert cap is None or len(m) <= cap
    loads = [sum(lengths[i] for m in r for i in m) for r in out]
    assert max(loads) - min(loads) <= max(lengths)  # longest-first greedy balance


def test_packed_collate_matches_padded():
    samples = [
        Sample(prompt_ids=[1, 5, 6], response_ids=[7, 8]),
        Sample(prompt_ids=[1, 4], response_ids=[9, 10, 11], advantages=None),
    ]
    packed, padded = collate(samples, 0, packed=True), collate(samples, 0)
    assert packed["input_ids"].tolist() == [[1, 5, 6, 7, 8, 1, 4, 9, 10, 11]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    assert packed["cu_seqlens"].tolist() == [0, 5, 10] and packed["max_seqlen"] == 5
    # the hidden state before each response token: positions 2, 3 | 6, 7, 8
    assert packed["pred_pos"].tolist() == [2, 3, 6, 7, 8]
    assert padded["pred_pos"].tolist() == [2, 3, 6, 7, 8]  # width 5: row 1 starts at 5 as well
    flat = padded["input_ids"].flatten()
    assert torch.equal(flat[padded["pred_pos"] + 1], packed["targets"])
    assert torch.equal(packed["targets"], torch.tensor([7, 8, 9, 10, 11]))
    assert packed["seq_index"].tolist() == [0, 0, 1, 1, 1]


def collate_by_loops(samples: list[Sample], pad_id: int, packed: bool) -> dict:
    """The collation written sequence by sequence (rlpost's is vectorised)."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    width = max(lengths)
    pred_pos, targets, seq_index, start = [], [], [], 0
    for b, s in enumerate(samples):
        p, n = len(s.prompt_ids), lengths[b]
        offset = start if packed else b * width
        pred_pos += list(range(p - 1 + offset, n - 1 + offset))
        targets += s.response_ids
        seq_index += [b] * len(s.response_ids)
        start += n
    out = {"pred_pos": pred_pos, "targets": targets, "seq_index": seq_index}
    if packed:
        out["input_ids"] = [[t for s in samples for t in s.prompt_ids + s.response_ids]]
        out["position_ids"] = [[i for n in lengths for i in range(n)]]
        out["cu_seqlens"] = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    else:
        out["input_ids"] = [
            s.prompt_ids + s.response_ids + [pad_id] * (width - n) for s, n in zip(samples, lengths)
        ]
        out["attention_mask"] = [[1] * n + [0] * (width - n) for n in lengths]
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("packed", [True, False])
def test_collate_matches_loops(seed, packed):
    rng = random.Random(seed)
    samples = []
    for _ in range(rng.randint(1, 12)):
        prompt = [rng.randint(1, 50) for _ in range(rng.randint(1, 9))]
        response = [rng.randint(1, 50) for _ in range(rng.randint(1, 7))]
        n = len(response)
        samples.append(
            Sample(
                prompt_ids=prompt,
                response_ids=response,
                advantages=torch.randn(n),
                old_logp=torch.randn(n),
                weights=torch.rand(n, dtype=torch.float64),
                extra={"h_hat": torch.randn(n)},
            )
        )
    got = collate(samples, pad_id=0, packed=packed)
    for key, value in collate_by_loops(samples, 0, packed).items():
        assert got[key].tolist() == value, key
    assert got["input_ids"].dtype == got["pred_pos"].dtype == torch.long
    for name in ("advantages", "old_logp", "weights"):
        assert torch.equal(got[name], torch.cat([getattr(s, name) for s in samples]).to(got[name].dtype))
    assert got["weights"].dtype == torch.float64 and got["advantages"].dtype == torch.float32
    assert torch.equal(got["extra"]["h_hat"], torch.cat([s.extra["h_hat"] for s in samples]))
    assert "ref_logp" not in got


def test_repeat_is_repeat_interleave():
    values, counts = torch.tensor([4, -1, 7, 2]), torch.tensor([2, 0, 3, 1])
    assert torch.equal(repeat(values, counts), torch.repeat_interleave(values, counts))
    assert repeat(torch.tensor([True, False]), torch.tensor([1, 2])).tolist() == [True, False, False]


def transport_samples(rng: random.Random, count: int, with_old_logp: bool = True) -> list[Sample]:
    prompt = [rng.randint(1, 50) for _ in range(5)]  # shared by the samples, as a group's are
    samples = []
    for i in range(count):
        n = rng.randint(1, 6)
        samples.append(
            Sample(
                prompt_ids=prompt if i % 2 else [rng.randint(1, 50) for _ in range(rng.randint(1, 9))],
                response_ids=[rng.randint(1, 50) for _ in range(n)],
                group=i // 2,
                reward=rng.random(),
                truncated=i % 3 == 0,
                rollout_logp=[-rng.random() for _ in range(n)] if i % 4 else [],
                advantages=torch.randn(n),
                old_logp=torch.randn(n) if with_old_logp else None,
                weights=torch.rand(n, dtype=torch.float64),
                extra={"mask": torch.rand(n) > 0.5, "pair": torch.full((n,), i, dtype=torch.long)},
            )
        )
    return samples


def assert_same_samples(got: list[Sample], want: list[Sample]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.prompt_ids, a.response_ids, a.group, a.reward, a.truncated, a.rollout_logp) == (
            b.prompt_ids,
            b.response_ids,
            b.group,
            b.reward,
            b.truncated,
            b.rollout_logp,
        )
        for name in TOKEN_FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), name
        assert a.extra.keys() == b.extra.keys()
        for k in a.extra:
            assert a.extra[k].dtype == b.extra[k].dtype and torch.equal(a.extra[k], b.extra[k])


@pytest.mark.parametrize("uniform", [True, False])
def test_a_shard_pickles_back_to_the_same_samples(uniform):
    """A rank's shard crosses to a Ray actor as columns (or, if its samples differ in their
    fields, sample by sample) and comes back as the same micro-batches of the same samples."""
    rng = random.Random(0)
    samples = transport_samples(rng, 9) + transport_samples(rng, 3, with_old_logp=uniform)
    assert all(isinstance(r, Shard) for r in shard(samples, num_ranks=2, max_seqs=4))
    rank = Shard([samples[:5], [], samples[5:]])  # ranks are padded with empty micro-batches
    back = pickle.loads(pickle.dumps(rank))
    assert isinstance(back, Shard) and [len(m) for m in back] == [len(m) for m in rank]
    assert_same_samples([s for m in back for s in m], [s for m in rank for s in m])
    assert pickle.loads(pickle.dumps(Shard([[], []]))) == [[], []]
