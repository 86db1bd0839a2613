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

import torch

from rlpost.algorithms.base import TOKEN_MASK, TOKEN_SCALE, MiniBatchView

TOKEN_FIELDS = ("advantages", "old_logp", "ref_logp", "weights", "temperature")

# Ray hands unpickled numpy arrays over as read-only views of its object store; the
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
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    temperature: torch.Tensor | None = None  # per-token sampling temperature (adaptive rules)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # algorithm's token_inputs

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)

    # Samples cross to Ray actors by the hundred: pickling a torch tensor costs tens
    # of microseconds, a numpy array a few, and that made up most of a Ray step.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in TOKEN_FIELDS:
            if state[name] is not None:
                state[name] = state[name].numpy()
        state["extra"] = {k: v.numpy() for k, v in self.extra.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        for name in TOKEN_FIELDS:
            if state[name] is not None:
                state[name] = torch.from_numpy(state[name])
        state["extra"] = {k: torch.from_numpy(v) for k, v in state["extra"].items()}
        self.__dict__.update(state)


def collate(samples: list[Sample], pad_id: int, packed: bool = False) -> dict:
    """Model inputs plus flat per-response-token tensors.

    Padded: `input_ids`/`attention_mask` [B, L]. Packed: `input_ids` and
    `position_ids` [1, T] with positions restarting at each sequence, plus
    `cu_seqlens` [B + 1] and `max_seqlen` for variable-length attention.
    `pred_pos[k]` is the flat index (into [B * L], or [T]) of the hidden state
    that predicts response token k (the position just before it).
    """
    # Index arithmetic over whole-batch tensors instead of a loop of small tensors per
    # sequence: collation runs on the controller path of every RL step.
    prompt_lens = torch.tensor([len(s.prompt_ids) for s in samples])
    response_lens = torch.tensor([len(s.response_ids) for s in samples])
    lengths = prompt_lens + response_lens
    width = int(lengths.max())
    tokens = torch.tensor([t for s in samples for part in (s.prompt_ids, s.response_ids) for t in part])
    seq_start = lengths.cumsum(0) - lengths  # of each sequence in `tokens`
    seq_index = torch.repeat_interleave(torch.arange(len(samples)), response_lens)
    # each response token's place within its response
    offset = torch.arange(len(seq_index)) - (response_lens.cumsum(0) - response_lens)[seq_index]
    row_start = seq_start if packed else torch.arange(len(samples)) * width
    out = {"pred_pos": (row_start + prompt_lens - 1)[seq_index] + offset,
           "targets": tokens[(seq_start + prompt_lens)[seq_index] + offset], "seq_index": seq_index}
    if packed:
        out["input_ids"] = tokens.unsqueeze(0)
        out["position_ids"] = (torch.arange(len(tokens))
                               - torch.repeat_interleave(seq_start, lengths)).unsqueeze(0)
        out["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int32),
                                       lengths.cumsum(0, dtype=torch.int32)])
        out["max_seqlen"] = width
    else:
        filled = torch.arange(width) < lengths[:, None]
        out["input_ids"] = torch.full((len(samples), width), pad_id, dtype=torch.long)
        out["input_ids"][filled] = tokens  # row-major order is the order of `tokens`
        out["attention_mask"] = filled.long()
    out["extra"] = {k: torch.cat([s.extra[k] for s in samples]) for k in samples[0].extra}
    for name in TOKEN_FIELDS:
        values = [getattr(s, name) for s in samples]
        if all(v is not None for v in values):
            out[name] = torch.cat(values).to(torch.float64 if name == "weights" else torch.float32)
    return out


def view(samples: list[Sample]) -> MiniBatchView:
    lengths = torch.tensor([s.num_tokens for s in samples], dtype=torch.long)
    masked = bool(samples) and TOKEN_MASK in samples[0].extra
    scaled = bool(samples) and TOKEN_SCALE in samples[0].extra
    return MiniBatchView(
        seq_index=torch.repeat_interleave(torch.arange(len(samples)), lengths),
        lengths=lengths,
        advantages=torch.cat([s.advantages for s in samples]) if samples and
        samples[0].advantages is not None else torch.zeros(int(lengths.sum())),
        group_index=torch.tensor([s.group for s in samples], dtype=torch.long),
        num_sequences=len(samples),
        token_mask=torch.cat([s.extra[TOKEN_MASK].bool() for s in samples]) if masked else None,
        token_scale=torch.cat([s.extra[TOKEN_SCALE] for s in samples]) if scaled else None,
    )


def plan(lengths: list[int], num_ranks: int, max_tokens: int | None = None,
         max_seqs: int | None = None, packed: bool = True) -> list[list[list[int]]]:
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
            fit = next((m for m in micros
                        if (max_seqs is None or len(m) < max_seqs)
                        and (max_tokens is None or cost(m, i) <= max_tokens)), None)
            if fit is None:
                micros.append([i])
            else:
                fit.append(i)
        out.append(micros)
    most = max(len(m) for m in out)
    for micros in out:
        micros.extend([] for _ in range(most - len(micros)))
    return out


def shard(samples: list[Sample], num_ranks: int, max_tokens: int | None = None,
          max_seqs: int | None = None, packed: bool = True) -> list[list[list[Sample]]]:
    """`plan` applied to samples: [rank][micro][Sample]."""
    lengths = [len(s.prompt_ids) + s.num_tokens for s in samples]
    return [[[samples[i] for i in micro] for micro in rank]
            for rank in plan(lengths, num_ranks, max_tokens, max_seqs, packed)]
