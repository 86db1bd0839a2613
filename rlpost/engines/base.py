"""What every rollout engine returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Completion:
    # sampled tokens, through the one that ended the response when one did: EOS, a
    # rollout.stop_token_ids id, or the token that completed a rollout.stop string
    ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    truncated: bool  # cut by the length limit (max_new_tokens, or the engine's context), no stop
    # the version of the weights that sampled it (rlpost/engines/weight_sync.py), set by the
    # rollout worker: the controller checks it is the learners' latest
    weight_version: int = 0
