"""Offline training data from JSONL, Parquet or a local Hugging Face dataset, in TRL's field
conventions, tokenized and validated row by row: preference pairs (`load_preference_pairs`,
for `rlpost dpo`) and supervised examples (`load_sft_examples`, for `rlpost sft`).

Row formats (TRL's):
- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of {"role", "content"} messages, `chosen` / `rejected`
  lists of (assistant) messages that continue it;
- implicit prompt: no `prompt` field; `chosen` and `rejected` are whole texts or
  conversations, and their longest common prefix is the prompt (as TRL's `extract_prompt`:
  messages compare whole; for text, a space just before the divergence goes to the responses).

cDPO's critical weights (loss `cdpo`): `rejected_weights`, one number >= 0 per token of the
rejected response as tokenized here (its EOS or closing template tokens included); the
field is read only when asked for (`rejected_weights=True`), and then every row needs it.

Supervised rows (TRL's SFT formats): `prompt` and `completion`, both strings or both lists of
messages; or `messages`, a conversation whose last message is the assistant's reply (the
response) and whose earlier messages are the prompt. Only the response is trained on (TRL's
completion-only loss; with several assistant turns, the earlier ones are prompt).

Tokenization. Text: BOS (if the tokenizer has one, as rlpost's RL prompts) + the encoded
prompt; the response is encoded together with the prompt, and gets an EOS at its end.
Conversations: the chat template renders the prompt with `add_generation_prompt=True` and
prompt + response as one conversation. Either way the response is what follows the prompt's
tokens in the tokenization of the whole sequence, so prompt ids + response ids are exactly
that tokenization. Where the prompt's own tokenization is not a prefix of it (tokens merged
across the boundary, or a template that renders a prompt alone differently), the split
moves back to where they diverge, for chosen and rejected alike, as TRL does, and the row
is listed in the report's `boundary_moved` (kept: the model then trains on a prompt
that ends slightly differently from the one it is given at inference).

Rows are numbered from 0, as rlpost/data/rows.py reads them. A bad row is skipped with its
reason (the first that applies, in the order of `REASONS`), or with `strict=True` stops the
loading with an error naming the file and the row; no later row is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlpost.data.rows import BadRow, DataReport, PreferenceDataError, read_rows

REASONS = {
    "invalid_json": "the line is not valid JSON",
    "missing_field": "a field is missing or null",
    "malformed": "a field has the wrong type or shape",
    "empty_prompt": "the prompt is empty",
    "empty_response": "chosen or rejected is empty",
    "identical": "chosen and rejected are identical",
    "too_long": "prompt + response is longer than max_length tokens",
    "bad_weights": "rejected_weights is not one number >= 0 per token of the rejected response",
}


@dataclass
class PreferencePair:
    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    rejected_weights: list[float] | None = None  # cDPO's w_t, one per rejected token
    # T-REG: the prompt under each revision template (`revisions`), and the token rewards r_t
    # of (chosen, rejected) that the runtime computes from them before training
    revised_prompt_ids: list[list[int]] | None = None
    token_rewards: tuple[list[float], list[float]] | None = None


@dataclass
class SFTExample:
    row: int
    prompt_ids: list[int]
    completion_ids: list[int]


# ----- checking a row --------------------------------------------------------------------


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )


def _empty(value: str | list) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not any(m["content"].strip() for m in value)


def _common_prefix(a: list | str, b: list | str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_implicit(chosen: str | list, rejected: str | list) -> tuple:
    k = _common_prefix(chosen, rejected)
    if isinstance(chosen, str) and 0 < k < min(len(chosen), len(rejected)) and chosen[k - 1] == " ":
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def _object(record: Any) -> dict:
    if not isinstance(record, dict):
        raise BadRow("malformed", f"a record must be an object, got {type(record).__name__}")
    return record


def _fields(record: Any) -> tuple[str | list, str | list, str | list]:
    """prompt, chosen, rejected of a record, all text or all messages (raises BadRow)."""
    _object(record)
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise BadRow("missing_field", f"no {key!r}")
    if "prompt" in record and record["prompt"] is None:
        raise BadRow("missing_field", "'prompt' is null")
    values = [record.get("prompt"), record["chosen"], record["rejected"]]
    present = values if "prompt" in record else values[1:]
    if not (all(isinstance(v, str) for v in present) or all(_is_messages(v) for v in present)):
        raise BadRow(
            "malformed",
            "prompt, chosen and rejected must be all strings or all lists "
            "of {'role': str, 'content': str} messages",
        )
    prompt, chosen, rejected = values if "prompt" in record else _split_implicit(*values[1:])
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise BadRow(
            "empty_prompt",
            "no prompt"
            if "prompt" in record
            else "chosen and rejected share no prefix to serve as the prompt",
        )
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if _empty(value):
            raise BadRow("empty_response", f"{key!r} is empty")
    if chosen == rejected:
        raise BadRow("identical", "chosen and rejected are identical")
    return prompt, chosen, rejected


def _sft_fields(record: Any) -> tuple[str | list, str | list]:
    """prompt and completion of a record, both text or both messages (raises BadRow)."""
    _object(record)
    if "messages" in record:
        messages = record["messages"]
        if messages is None:
            raise BadRow("missing_field", "'messages' is null")
        if not _is_messages(messages) or not messages:
            raise BadRow(
                "malformed", "'messages' must be a non-empty list of {'role': str, 'content': str} messages"
            )
        if messages[-1]["role"] != "assistant":
            raise BadRow(
                "malformed",
                f"the last message is from {messages[-1]['role']!r}; it must be the assistant's reply",
            )
        prompt, completion = messages[:-1], messages[-1:]
        if not prompt:
            raise BadRow("empty_prompt", "no message before the assistant's reply")
    else:
        for key in ("prompt", "completion"):
            if record.get(key) is None:
                raise BadRow("missing_field", f"no {key!r} (and no 'messages')")
        prompt, completion = record["prompt"], record["completion"]
        if not (
            all(isinstance(v, str) for v in (prompt, completion))
            or all(_is_messages(v) for v in (prompt, completion))
        ):
            raise BadRow(
                "malformed",
                "prompt and completion must be both strings or both lists "
                "of {'role': str, 'content': str} messages",
            )
        if _empty(prompt):
            raise BadRow("empty_prompt", "the prompt is empty")
    if _empty(completion):
        raise BadRow("empty_response", "the completion is empty")
    return prompt, completion


def _weights(record: dict, tokens: int) -> list[float]:
    """The row's `rejected_weights`, checked against the rejected response's `tokens`."""
    values = record.get("rejected_weights")
    if values is None:
        raise BadRow(
            "missing_field", "no 'rejected_weights' (loss cdpo needs a critical weight per rejected token)"
        )
    if not isinstance(values, list) or len(values) != tokens:
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise BadRow("bad_weights", f"rejected_weights has {got}; the rejected response has {tokens} tokens")
    for i, w in enumerate(values):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise BadRow("bad_weights", f"rejected_weights[{i}] = {w!r} is not a finite number >= 0")
    return [float(w) for w in values]


# ----- tokenizing ------------------------------------------------------------------------


class _Tokenize:
    def __init__(self, tokenizer, source: Path):
        self.tok, self.source = tokenizer, source
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def render(self, messages: list, generation_prompt: bool) -> list[int]:
        if self.tok.chat_template is None:
            raise PreferenceDataError(
                f"{self.source}: conversational rows need a tokenizer with a chat template; this one has none"
            )
        return self.encode(
            self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        )

    def whole(self, prompt: str | list, response: str | list) -> list[int]:
        if isinstance(prompt, list):
            return self.render(prompt + response, generation_prompt=False)
        ids = self.bos + self.encode(prompt + response)
        return ids if ids and ids[-1] == self.eos else ids + [self.eos]

    def prompt(self, prompt: str | list) -> list[int]:
        return (
            self.render(prompt, generation_prompt=True)
            if isinstance(prompt, list)
            else self.bos + self.encode(prompt)
        )

    def __call__(self, prompt, *responses) -> tuple[list[int], list[list[int]], bool]:
        """prompt ids, the ids of each response, and whether the boundary moved."""
        prompt_ids = self.prompt(prompt)
        wholes = [self.whole(prompt, r) for r in responses]
        k = min(_common_prefix(prompt_ids, w) for w in wholes)
        return wholes[0][:k], [w[k:] for w in wholes], k < len(prompt_ids)


def revise(prompt: str | list, template: str) -> str | list:
    """`template` with "{prompt}" replaced by the prompt; of a conversation, the content of its
    last user message is replaced by `template` around it (T-REG's revision prompts)."""
    if isinstance(prompt, str):
        return template.replace("{prompt}", prompt)
    users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
    if not users:
        raise BadRow("malformed", "the prompt has no user message to put in the revision prompts")
    out = [dict(m) for m in prompt]
    out[users[-1]]["content"] = template.replace("{prompt}", out[users[-1]]["content"])
    return out


def _check_lengths(prompt_ids: list[int], responses: list[list[int]], max_length: int | None) -> None:
    if not prompt_ids:
        raise BadRow("empty_prompt", "the prompt has no tokens")
    if not all(responses):  # a chat template that drops a reply
        raise BadRow("empty_response", "a response has no tokens")
    longest = len(prompt_ids) + max(map(len, responses))
    if max_length is not None and longest > max_length:
        raise BadRow("too_long", f"{longest} tokens > max_length {max_length}")


def _load(path: Path, split: str | None, strict: bool, unit: str, make) -> tuple[list, DataReport]:
    """`make(row, record) -> (item, boundary moved)` over the rows, raising BadRow for a bad
    one: skipped and reported, or under `strict` the error naming the file and the row."""
    report = DataReport(str(path), unit=unit)
    items = []
    for row, record in enumerate(read_rows(path, split)):
        report.rows += 1
        try:
            if isinstance(record, BadRow):
                raise record
            item, moved = make(row, record)
        except BadRow as bad:
            if strict:
                raise PreferenceDataError(f"{path}: row {row}: {bad.reason}: {bad.detail}") from None
            report.skip(row, bad)
            continue
        if moved:
            report.boundary_moved.append(row)
        items.append(item)
    report.order(REASONS)
    return items, report


def load_preference_pairs(
    path: str | Path,
    tokenizer,
    max_length: int | None = None,
    strict: bool = False,
    split: str | None = None,
    rejected_weights: bool = False,
    revisions: tuple[str, ...] = (),
) -> tuple[list[PreferencePair], DataReport]:
    """Tokenized pairs of the valid rows of `path`, and the report of the rows skipped.

    `max_length`: a pair whose prompt + chosen or prompt + rejected has more tokens is
    skipped (never truncated). `split`: the split of a `DatasetDict` directory ("train"
    by default). `strict`: the first bad row raises PreferenceDataError.
    `rejected_weights`: read cDPO's critical weights (every row must have them).
    `revisions`: templates (`revise`) whose prompts are tokenized as the prompt is, into
    `revised_prompt_ids`; the responses keep the ids they have after the original prompt."""
    path = Path(path)
    tokenize = _Tokenize(tokenizer, path)

    def make(row: int, record: Any) -> tuple[PreferencePair, bool]:
        prompt, chosen, rejected = _fields(record)
        prompt_ids, (chosen_ids, rejected_ids), moved = tokenize(prompt, chosen, rejected)
        _check_lengths(prompt_ids, [chosen_ids, rejected_ids], max_length)
        weights = _weights(record, len(rejected_ids)) if rejected_weights else None
        revised = [tokenize.prompt(revise(prompt, t)) for t in revisions] or None
        return PreferencePair(row, prompt_ids, chosen_ids, rejected_ids, weights, revised), moved

    return _load(path, split, strict, "pairs", make)


def load_sft_examples(
    path: str | Path, tokenizer, max_length: int | None = None, strict: bool = False, split: str | None = None
) -> tuple[list[SFTExample], DataReport]:
    """Tokenized prompt / completion examples of the valid rows of `path`, and the report of
    the rows skipped; the arguments are those of `load_preference_pairs`."""
    path = Path(path)
    tokenize = _Tokenize(tokenizer, path)

    def make(row: int, record: Any) -> tuple[SFTExample, bool]:
        prompt_ids, (completion_ids,), moved = tokenize(*_sft_fields(record))
        _check_lengths(prompt_ids, [completion_ids], max_length)
        return SFTExample(row, prompt_ids, completion_ids), moved

    return _load(path, split, strict, "examples", make)
