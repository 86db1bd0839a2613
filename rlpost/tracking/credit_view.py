"""Where an RL algorithm puts its credit, token by token, as an HTML page and a PNG.

A few responses of a step, each drawn token by token with its per-token advantage on one
diverging scale for the whole view (blue negative, white 0, red positive, full colour at the
largest |advantage| shown): the token view of cDPO (rlpost/tracking/token_view.py) with
signed weights. Outcome-level methods give every token of a response the same colour;
step- and token-level ones (PPO, VinePPO, PURE, PRIME) show where inside a response they
move the policy.

`pick_credit_rows` chooses what to show: groups whose responses disagree on the outcome
hold the contrast the credit is about, so the best and the worst response of each of the
first such groups.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

from rlpost.tracking.token_view import WeightedTokens, write_token_view

_LABEL = re.compile(r"[\w.-]+", re.ASCII)


def write_credit_view(
    out_dir: Path, label: str, rows: list[tuple[str, list[str], list[float]]], method: str
) -> tuple[Path, Path]:
    """Writes out_dir/credit_<label>.html and .png; returns their paths. Each row is (title,
    the response's tokens as decoded text pieces, one advantage per token); a single number
    instead of a list is a response-level advantage, drawn on every token. `label` is part
    of the file names: letters, digits, '.', '-' and '_'."""
    if not _LABEL.fullmatch(label):
        raise ValueError(f"write_credit_view: label {label!r} is not a file name part ([A-Za-z0-9_.-]+)")
    weighted = []
    for title, tokens, advantages in rows:
        if isinstance(advantages, Real):
            advantages = [float(advantages)] * len(tokens)
        weighted.append(WeightedTokens(title, None, list(tokens), [float(a) for a in advantages]))
    return write_token_view(
        out_dir,
        weighted,
        f"{method}: per-token advantages ({label})",
        "advantage",
        stem=f"credit_{label}",
        signed=True,
        tokens_name="response",
    )


def _groups(rewards, groups: Sequence | None) -> tuple[list[float], list]:
    """Flat rewards and each sample's group: `groups` as given, or the rows of 2-D rewards."""
    if hasattr(rewards, "tolist"):
        rewards = rewards.tolist()
    rewards = list(rewards)
    if groups is None:
        if not all(isinstance(r, (list, tuple)) for r in rewards):
            raise ValueError("pick_credit_rows: pass each sample's group, or rewards as [groups, group size]")
        groups = [p for p, row in enumerate(rewards) for _ in row]
        rewards = [r for row in rewards for r in row]
    else:
        groups = groups.tolist() if hasattr(groups, "tolist") else list(groups)
    return [float(r) for r in rewards], groups


def pick_credit_rows(
    samples_tokens: Sequence[Sequence],
    advantages: Sequence,
    rewards,
    groups: Sequence | None = None,
    k: int = 4,
) -> list[int]:
    """Indices of up to k responses to show: the best and the worst (by reward; the first
    on a tie) of each of the first groups, in order, whose responses have different
    rewards; when those are too few, the first response of each other group, then any,
    in order. Responses with no tokens are never picked. `rewards` are one per sample with
    `groups` each sample's group id, or [groups, group size] (samples flat in that order);
    `advantages` are each sample's per-token advantages (checked against its tokens) or
    one number per sample. Deterministic: the same inputs give the same picks."""
    flat, group_of = _groups(rewards, groups)
    n = len(samples_tokens)
    if not len(advantages) == len(flat) == len(group_of) == n:
        raise ValueError(
            f"pick_credit_rows: {n} samples, {len(advantages)} advantages, {len(flat)} rewards, "
            f"{len(group_of)} group ids"
        )
    for i, (tokens, a) in enumerate(zip(samples_tokens, advantages)):
        scalar = isinstance(a, Real) or getattr(a, "ndim", None) == 0
        if not scalar and len(a) != len(tokens):
            raise ValueError(f"pick_credit_rows: sample {i} has {len(tokens)} tokens but {len(a)} advantages")
    members: dict = {}
    for i, g in enumerate(group_of):
        if len(samples_tokens[i]):
            members.setdefault(g, []).append(i)
    picked: list[int] = []
    for idx in members.values():
        if len(picked) >= k:
            break
        if len({flat[i] for i in idx}) < 2:
            continue
        best = max(idx, key=lambda i: (flat[i], -i))
        worst = min(idx, key=lambda i: (flat[i], i))
        picked += [best, worst][: k - len(picked)]
    chosen = set(picked)
    fill = [idx[0] for idx in members.values() if not chosen & set(idx)]
    fill += [i for idx in members.values() for i in idx]
    for i in fill:
        if len(picked) >= k:
            break
        if i not in chosen:
            picked.append(i)
            chosen.add(i)
    return picked
