"""Supervised fine-tuning, token-mean over the response tokens (the warm-up stage, and the
positive / negative models of cDPO), with the loss per token of ALGORITHMS.md section 3:

- nll:  -log p_t
- dft:  -sg(p_t) log p_t (Dynamic Fine-Tuning)
- asft: dft + asft_lambda * KL(pi_ref(.|s_t) || pi_theta(.|s_t)) over the full vocabulary
  (Anchored SFT). The learner computes that KL in its forward pass, chunk by chunk
  (`token_ops.chunked_token_kl`), and hands it over as `TokenTensors.extra[TOKEN_KL]`.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from rlpost.algorithms.aggregation import token_mean
from rlpost.algorithms.base import AlgoConfig, Algorithm, MiniBatchView, Needs, TokenTensors

# Key of `TokenTensors.extra` with the per-token full-vocabulary KL(pi_ref || pi_theta), with
# its gradient w.r.t. the policy.
TOKEN_KL = "token_kl"


class SFTConfig(AlgoConfig):
    loss: Literal["nll", "dft", "asft"] = "nll"
    asft_lambda: float = Field(0.05, ge=0, description="ASFT: weight of the KL to the reference")

    @model_validator(mode="after")
    def _consistent(self) -> "SFTConfig":
        if "asft_lambda" in self.model_fields_set and self.loss != "asft":
            raise ValueError(f"algorithm.asft_lambda is set but algorithm.loss is {self.loss!r}; "
                             "set algorithm.loss: asft")
        return self


class SFT(Algorithm):
    name = "sft"
    Config = SFTConfig

    def __init__(self, cfg: SFTConfig):
        super().__init__(cfg)
        self.needs = Needs(reference=cfg.loss == "asft", token_kl=cfg.loss == "asft")

    def advantages(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise TypeError("sft is a supervised loss; it computes no advantages")

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        return token_mean(batch)

    def token_loss(self, t: TokenTensors):
        nll = -t.logp
        metrics = {"nll": nll.detach()}
        if self.cfg.loss == "nll":
            return nll, metrics
        loss = t.logp.detach().exp() * nll
        if self.cfg.loss == "asft":
            if TOKEN_KL not in t.extra:
                raise KeyError(f"sft loss 'asft' needs the per-token KL to the reference as "
                               f"TokenTensors.extra[{TOKEN_KL!r}] (token_ops.chunked_token_kl)")
            kl = t.extra[TOKEN_KL]
            loss = loss + self.cfg.asft_lambda * kl
            metrics["kl"] = kl.detach()
        return loss, metrics
