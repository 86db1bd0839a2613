"""What every rollout engine returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Completion:
    ids: list[int]  # sampled tokens, EOS included when generation stopped on it
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    truncated: bool  # stopped by max_new_tokens
