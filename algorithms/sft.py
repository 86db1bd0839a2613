"""Supervised fine-tuning: token-mean negative log-likelihood (the warm-up stage)."""
from __future__ import annotations

import torch

from rlpost.algorithms.aggregation import token_mean
from rlpost.algorithms.base import Algorithm, MiniBatchView, TokenTensors


class SFT(Algorithm):
    name = "sft"

    def advantages(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise TypeError("sft is a supervised loss; it computes no advantages")

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        return token_mean(batch)

    def token_loss(self, t: TokenTensors):
        return -t.logp, {"nll": -t.logp.detach()}
