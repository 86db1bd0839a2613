"""Where a response's steps end, for step-level credit (docs/algorithms.md section 5;
the `step_credit` section, rlpost/config/credit.py).

Steps are found in the response's text, then mapped to tokens:

- `char_step_ends`: the exclusive character end of each step. `split` is a regular
  expression whose matches end a step (the match belongs to the step it ends), or
  "pkg.module:function" taking the text and returning the character offsets where its
  steps end. Whatever follows the last end is one more step (an empty rest is not). Then a
  step shorter than `min_chars` is merged into the next; a short last step into the one
  before it. The steps partition the text: every character is in exactly one.
- `token_step_ends`: the exclusive token end of each step: the first token t whose prefix
  ids[:t] decodes to at least the step's characters, found by binary search (O(K log n)
  decodes for K steps of n tokens). A token that spans a step's end (BPE merges a
  delimiter with what follows it) goes to the step it ends in. Two ends inside one token
  give one step. The last end is always the response's length: trailing tokens that
  decode to nothing (EOS) belong to the last step, and a response whose text is empty is
  one step, so every token of a non-empty response is in a step.
- `StepSplitter`: both for the runtime, with step texts that match the token steps one to
  one (the texts are the text cut at the kept character ends: a step's text can differ
  from its tokens' decoding by the part of a token that spans its end).

A `split` that looks like an import path (`name.name:name`) is read as one; write a
regular expression of that shape with a group, `(?:step:end)`.
"""

from __future__ import annotations

import bisect
import functools
import importlib
import operator
import re
from collections.abc import Callable, Sequence

from rlpost.config.credit import StepsConfig
from rlpost.errors import ConfigError

_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def is_function_path(split: str) -> bool:
    return _PATH.fullmatch(split) is not None


@functools.lru_cache(maxsize=64)
def _function(path: str) -> Callable[[str], Sequence[int]]:
    """The function of "pkg.module:function", imported once; a ConfigError naming
    step_credit.split otherwise."""
    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"key 'step_credit.split': cannot import {path!r}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"key 'step_credit.split': module {module_name!r} has no function {name!r}")
    return fn


@functools.lru_cache(maxsize=64)
def _pattern(split: str) -> re.Pattern:
    try:
        return re.compile(split)
    except re.error as e:
        raise ConfigError(f"key 'step_credit.split': {split!r} is not a regular expression: {e}") from None


def check_split(split: str) -> None:
    """Imports or compiles `split` now, so that a bad one fails before a run starts."""
    _function(split) if is_function_path(split) else _pattern(split)


def _function_ends(path: str, text: str) -> list[int]:
    result = _function(path)(text)
    where = f"step_credit.split function {path} on the text {text[:60]!r}"
    ends = []
    try:
        for e in result:
            if isinstance(e, bool):  # an int to Python, never a character offset
                raise TypeError
            ends.append(operator.index(e))
    except TypeError:
        raise ValueError(f"{where}: returned {result!r}, not a list of character offsets") from None
    if any(not 0 < e <= len(text) for e in ends):
        raise ValueError(f"{where}: offsets {ends} are not all within (0, {len(text)}]")
    if any(b <= a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"{where}: offsets {ends} are not increasing")
    return ends


def _merge_short(ends: list[int], min_chars: int) -> list[int]:
    """Drops the end of each step shorter than `min_chars` (it joins the next); a short
    last step joins the one before it."""
    kept, start = [], 0
    for i, end in enumerate(ends):
        if end - start >= min_chars or i == len(ends) - 1:
            kept.append(end)
            start = end
    if len(kept) > 1 and kept[-1] - kept[-2] < min_chars:
        del kept[-2]
    return kept


def char_step_ends(text: str, split: str, min_chars: int = 0) -> list[int]:
    """The exclusive character end of each step of `text`, increasing, the last len(text);
    [] for an empty text."""
    if not text:
        return []
    if is_function_path(split):
        ends = _function_ends(split, text)
    else:
        ends, last = [], 0
        for m in _pattern(split).finditer(text):
            if m.end() > last:  # an empty match at a step's end ends nothing new
                ends.append(m.end())
                last = m.end()
    if not ends or ends[-1] < len(text):
        ends.append(len(text))
    return _merge_short(ends, min_chars)


def _token_and_char_ends(
    response_ids: Sequence[int], char_ends: Sequence[int], decode: Callable[[list[int]], str]
) -> list[tuple[int, int]]:
    """(token end, character end) of each step after duplicates are dropped; a kept step's
    character end is the last of those that fell in its token."""
    n = len(response_ids)
    if n == 0:
        return []
    if not char_ends:
        return [(n, 0)]
    ids = list(response_ids)
    lengths: dict[int, int] = {}

    def decoded(t: int) -> int:
        if t not in lengths:
            lengths[t] = len(decode(ids[:t]))
        return lengths[t]

    pairs: list[tuple[int, int]] = []
    lo = 1
    for c in char_ends[:-1]:
        # the first t in [lo, n] with decoded(t) >= c (n when none is)
        t = lo + bisect.bisect_left(range(lo, n), c, key=decoded)
        if pairs and pairs[-1][0] == t:
            pairs[-1] = (t, c)
        else:
            pairs.append((t, c))
        lo = t
    if pairs and pairs[-1][0] == n:
        pairs.pop()
    pairs.append((n, char_ends[-1]))
    return pairs


def token_step_ends(
    response_ids: Sequence[int], char_ends: Sequence[int], decode: Callable[[list[int]], str]
) -> list[int]:
    """The exclusive token end of each step whose characters end at `char_ends` (increasing,
    the last the text's length), where `decode(ids)` is the tokenizer's decoding
    (skip_special_tokens=True); strictly increasing, the last len(response_ids); [] for an
    empty response, [len(response_ids)] when `char_ends` is empty (an empty text)."""
    return [t for t, _ in _token_and_char_ends(response_ids, char_ends, decode)]


def step_texts(text: str, char_ends: Sequence[int]) -> list[str]:
    """The text of each step: `text` cut at `char_ends`."""
    starts = [0, *char_ends[:-1]]
    return [text[a:b] for a, b in zip(starts, char_ends)]


class StepSplitter:
    """A response's text, step ends in tokens and step texts, as `step_credit` says; a bad
    `split` fails when the splitter is built."""

    def __init__(self, cfg: StepsConfig, tokenizer):
        check_split(cfg.split)
        self.split, self.min_chars = cfg.split, cfg.min_chars
        self.tokenizer = tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, response_ids: Sequence[int]) -> tuple[str, list[int], list[str]]:
        """(text, token ends, step texts), one text per token step: no step for an empty
        response, one step "" for tokens that decode to nothing (an EOS alone)."""
        ids = list(response_ids)
        text = self.decode(ids)
        pairs = _token_and_char_ends(ids, char_step_ends(text, self.split, self.min_chars), self.decode)
        if pairs and pairs[-1][1] == 0:  # tokens, but an empty text: one empty step
            return text, [len(ids)], [text]
        return text, [t for t, _ in pairs], step_texts(text, [c for _, c in pairs])
