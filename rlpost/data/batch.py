"""Samples, and how a mini-batch becomes learner micro-batches.

A `Sample` is one prompt + response. Per-token fields (advantages, old and
reference log-probs, aggregation weights, per-token temperatures) are 1-D
tensors over the response tokens and travel flat. A micro-batch is either
packed (all sequences end to end in one row, attention kept within each by
position ids / cu_seqlens) or right-padded to its own longest sequence;
`plan` cuts micro-batches by a token budget so that neither wastes compute on a
fixed sequence count.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from rlpost.algorithms.base import TOKEN_MASK, TOKEN_SCALE, MiniBatchView

TOKEN_FIELDS = ("advantages", "old_logp", "ref_logp", "weights", "temperature")

# Ray hands a `Shard`'s columns over as read-only numpy views of its object store; the
# tensors made from them are only read (collate concatenates them), so torch's warning
# about writing into them would be noise on every learner's console.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    group: int = 0  # index of the prompt within the rollout batch
    reward: float = 0.0
    truncated: bool = False
    rollout_logp: list[float] = field(default_factory=list)
    # the version of the weights that sampled it (the engine's Completion.weight_version:
    # the learners' optimizer steps then); the controller's, not sent to the learners
    weight_version: int = 0
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    temperature: torch.Tensor | None = None  # per-token sampling temperature (adaptive rules)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # algorithm's token_inputs

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)


def per_sample(flat: dict[str, torch.Tensor | None], samples: list[Sample]) -> dict[str, list]:
    """Per-token results over `samples` end to end (as `Learner.logprobs` returns them), cut
    into one piece per sample; a result that is None gives None for every sample."""
    sizes = [s.num_tokens for s in samples]
    return {k: list(v.split(sizes)) if v is not None else [None] * len(samples) for k, v in flat.items()}


class Shard(list):
    """One learner rank's micro-batches ([micro][Sample]), as `shard` returns them (or its
    groups of samples, for TW-GRPO's position divergences).

    Pickled (as Ray sends it to a learner actor) it travels column by column: each field
    of all its samples as one flat array, plus lengths. Sample by sample, a rank's few
    hundred samples are a few thousand small objects and arrays, each with a fixed cost
    in the pickler and in Ray's buffer handling; that cost was the largest part of the
    Ray path's framework overhead on the quickstart (docs/performance.md)."""

    def __reduce__(self):
        samples = [s for micro in self for s in micro]
        if not samples or not _uniform(samples):
            return Shard, (list(self),)
        return _unpack_shard, ([len(micro) for micro in self], _columns(samples))


def _uniform(samples: list[Sample]) -> bool:
    """Whether every sample has the same token fields and extra keys, of the same dtypes
    (always so within one job); the columns hold nothing else."""

    def signature(s: Sample):
        return (
            [None if getattr(s, n) is None else getattr(s, n).dtype for n in TOKEN_FIELDS],
            [(k, v.dtype) for k, v in s.extra.items()],
        )

    first = signature(samples[0])
    return all(signature(s) == first for s in samples[1:])


def _flat(values: list, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample sequences (tensors, or lists of `dtype`) as one flat array and their lengths."""
    if dtype is None:
        return torch.cat(values).numpy(), np.array([v.shape[0] for v in values], dtype=np.int64)
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    return np.fromiter(chain.from_iterable(values), dtype=dtype, count=int(lengths.sum())), lengths


def _columns(samples: list[Sample]) -> dict:
    first = samples[0]
    return {
        "prompt_ids": _flat([s.prompt_ids for s in samples], np.int64),
        "response_ids": _flat([s.response_ids for s in samples], np.int64),
        "rollout_logp": _flat([s.rollout_logp for s in samples], np.float64),
        "group": np.array([s.group for s in samples], dtype=np.int64),
        "reward": np.array([s.reward for s in samples], dtype=np.float64),
        "truncated": np.array([s.truncated for s in samples], dtype=bool),
        "tokens": {
            n: _flat([getattr(s, n) for s in samples]) for n in TOKEN_FIELDS if getattr(first, n) is not None
        },
        "extra": {k: _flat([s.extra[k] for s in samples]) for k in first.extra},
    }


def _split(column: tuple[np.ndarray, np.ndarray], as_list: bool = False) -> list:
    flat, lengths = column
    ends = lengths.cumsum()
    if as_list:
        values = flat.tolist()
        return [values[end - n : end] for n, end in zip(lengths.tolist(), ends.tolist())]
    return list(torch.from_numpy(flat).split(lengths.tolist()))


def _unpack_shard(sizes: list[int], columns: dict) -> Shard:
    tokens = {n: _split(c) for n, c in columns["tokens"].items()}
    extra = {k: _split(c) for k, c in columns["extra"].items()}
    samples = [
        Sample(
            prompt_ids=p,
            response_ids=r,
            group=g,
            reward=w,
            truncated=t,
            rollout_logp=lp,
            **{n: v[i] for n, v in tokens.items()},
            extra={k: v[i] for k, v in extra.items()},
        )
        for i, (p, r, lp, g, w, t) in enumerate(
            zip(
                _split(columns["prompt_ids"], True),
                _split(columns["response_ids"], True),
                _split(columns["rollout_logp"], True),
                columns["group"].tolist(),
                columns["reward"].tolist(),
                columns["truncated"].tolist(),
            )
        )
    ]
    out, start = Shard(), 0
    for n in sizes:
        out.append(samples[start : start + n])
        start += n
    return out


def repeat(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`torch.repeat_interleave(values, counts)` on the CPU without a parallel region: torch
    runs that op on its thread pool whatever its size, and when the pool has gone to sleep
    between RL phases waking it costs milliseconds, more than the rest of a collation."""
    return torch.from_numpy(np.repeat(values.numpy(), counts.numpy()))


def collate(samples: list[Sample], pad_id: int, packed: bool = False) -> dict:
    """Model inputs plus flat per-response-token tensors.

    Padded: `input_ids`/`attention_mask` [B, L]. Packed: `input_ids` and
    `position_ids` [1, T] with positions restarting at each sequence, plus
    `cu_seqlens` [B + 1] and `max_seqlen` for variable-length attention.
    `pred_pos[k]` is the flat index (into [B * L], or [T]) of the hidden state
    that predicts response token k (the position just before it).
    """
    # Index arithmetic over whole-batch arrays instead of a loop of small tensors per
    # sequence, in numpy: torch would run some of these ops on its thread pool, and waking
    # it after an idle phase costs more than the whole collation (see `repeat`).
    count = len(samples)
    prompt_lens = np.fromiter((len(s.prompt_ids) for s in samples), np.int64, count)
    response_lens = np.fromiter((len(s.response_ids) for s in samples), np.int64, count)
    lengths = prompt_lens + response_lens
    width = int(lengths.max())
    tokens = np.fromiter(
        chain.from_iterable(part for s in samples for part in (s.prompt_ids, s.response_ids)),
        np.int64,
        int(lengths.sum()),
    )
    seq_start = lengths.cumsum() - lengths  # of each sequence in `tokens`
    seq_index = np.repeat(np.arange(count), response_lens)
    # each response token's place within its response
    offset = np.arange(len(seq_index)) - (response_lens.cumsum() - response_lens)[seq_index]
    row_start = seq_start if packed else np.arange(count) * width
    arrays = {
        "pred_pos": (row_start + prompt_lens - 1)[seq_index] + offset,
        "targets": tokens[(seq_start + prompt_lens)[seq_index] + offset],
        "seq_index": seq_index,
    }
    if packed:
        arrays["input_ids"] = tokens[None]
        arrays["position_ids"] = (np.arange(len(tokens)) - np.repeat(seq_start, lengths))[None]
        arrays["cu_seqlens"] = np.concatenate([[0], lengths.cumsum()]).astype(np.int32)
    else:
        filled = np.arange(width) < lengths[:, None]
        arrays["input_ids"] = np.full((count, width), pad_id, dtype=np.int64)
        arrays["input_ids"][filled] = tokens  # row-major order is the order of `tokens`
        arrays["attention_mask"] = filled.astype(np.int64)
    out = {k: torch.from_numpy(v) for k, v in arrays.items()}
    if packed:
        out["max_seqlen"] = width
    out["extra"] = {k: torch.cat([s.extra[k] for s in samples]) for k in samples[0].extra}
    for name in TOKEN_FIELDS:
        values = [getattr(s, name) for s in samples]
        if all(v is not None for v in values):
            out[name] = torch.cat(values).to(torch.float64 if name == "weights" else torch.float32)
    # the engine's log-probs (pi_b of the off-policy corrections), only where every sample
    # has one per response token: samples scored by no engine (tests, offline data) have none
    if all(len(s.rollout_logp) == s.num_tokens for s in samples):
        flat = np.fromiter(chain.from_iterable(s.rollout_logp for s in samples), np.float32, len(seq_index))
        out["rollout_logp"] = torch.from_numpy(flat)
    return out


def view(samples: list[Sample]) -> MiniBatchView:
    lengths = torch.tensor([s.num_tokens for s in samples], dtype=torch.long)
    masked = bool(samples) and TOKEN_MASK in samples[0].extra
    scaled = bool(samples) and TOKEN_SCALE in samples[0].extra
    return MiniBatchView(
        seq_index=repeat(torch.arange(len(samples)), lengths),
        lengths=lengths,
        advantages=torch.cat([s.advantages for s in samples])
        if samples and samples[0].advantages is not None
        else torch.zeros(int(lengths.sum())),
        group_index=torch.tensor([s.group for s in samples], dtype=torch.long),
        num_sequences=len(samples),
        token_mask=torch.cat([s.extra[TOKEN_MASK].bool() for s in samples]) if masked else None,
        token_scale=torch.cat([s.extra[TOKEN_SCALE] for s in samples]) if scaled else None,
        old_logp=torch.cat([s.old_logp for s in samples])
        if samples and all(s.old_logp is not None for s in samples)
        else None,
    )


def plan(
    lengths: list[int],
    num_ranks: int,
    max_tokens: int | None = None,
    max_seqs: int | None = None,
    packed: bool = True,
) -> list[list[list[int]]]:
    """Assign sequences (by index) to ranks and micro-batches: [rank][micro][index].

    Ranks get about equal token counts (longest first, each to the rank with
    the fewest tokens so far). Within a rank, micro-batches are filled first-fit
    longest first under `max_tokens` (what the model computes: the sum of
    lengths when packed, longest x count when padded) and `max_seqs`; a
    sequence longer than the budget gets a micro-batch of its own. Every rank
    gets the same number of micro-batches (possibly empty) so that ranks step
    together. Any partition gives the same loss, since aggregation weights are
    fixed over the whole mini-batch beforehand.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    load = [0] * num_ranks
    for i in order:
        r = min(range(num_ranks), key=lambda k: (load[k], k))
        ranks[r].append(i)
        load[r] += lengths[i]

    def cost(micro: list[int], i: int) -> int:
        if packed:
            return sum(lengths[j] for j in micro) + lengths[i]
        return max(lengths[micro[0]], lengths[i]) * (len(micro) + 1)

    out = []
    for members in ranks:
        micros: list[list[int]] = []
        for i in members:
            fit = next(
                (
                    m
                    for m in micros
                    if (max_seqs is None or len(m) < max_seqs)
                    and (max_tokens is None or cost(m, i) <= max_tokens)
                ),
                None,
            )
            if fit is None:
                micros.append([i])
            else:
                fit.append(i)
        out.append(micros)
    most = max(len(m) for m in out)
    for micros in out:
        micros.extend([] for _ in range(most - len(micros)))
    return out


def shard(
    samples: list[Sample],
    num_ranks: int,
    max_tokens: int | None = None,
    max_seqs: int | None = None,
    packed: bool = True,
) -> list[list[list[Sample]]]:
    """`plan` applied to samples: [rank][micro][Sample]."""
    lengths = [len(s.prompt_ids) + s.num_tokens for s in samples]
    return [
        Shard([samples[i] for i in micro] for micro in rank)
        for rank in plan(lengths, num_ranks, max_tokens, max_seqs, packed)
    ]
