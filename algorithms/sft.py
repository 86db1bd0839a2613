"""Supervised fine-tuning losses per token: NLL, DFT and ASFT (docs/algorithms.md section 3).

Token-mean over the response tokens (the warm-up stage, and the positive / negative models
of cDPO), with the loss per token:

- nll:  -log p_t
- dft:  -sg(p_t) log p_t (Dynamic Fine-Tuning)
- asft: dft + asft_lambda * KL(pi_ref(.|s_t) || pi_theta(.|s_t)) over the full vocabulary
  (Anchored SFT). The learner computes that KL in its forward pass, chunk by chunk
  (`token_ops.chunked_token_kl`), and hands it over as `TokenTensors.extra[TOKEN_KL]`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlpost.algorithms.aggregation import token_mean
from rlpost.algorithms.base import (
    TOKEN_KL,
    AlgoConfig,
    Conditional,
    MiniBatchView,
    Needs,
    TokenLoss,
    TokenTensors,
)


class SFTConfig(AlgoConfig):
    loss: Literal["nll", "dft", "asft"] = "nll"
    asft_lambda: float = Field(0.05, ge=0, description="ASFT: weight of the KL to the reference")

    conditionals = (Conditional("asft_lambda", "loss", ("asft",), "set algorithm.loss: asft"),)


class SFT(TokenLoss):
    name = "sft"
    Config = SFTConfig

    def __init__(self, cfg: SFTConfig):
        super().__init__(cfg)
        self.needs = Needs(reference=cfg.loss == "asft", token_kl=cfg.loss == "asft")

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
                raise KeyError(
                    f"sft loss 'asft' needs the per-token KL to the reference as "
                    f"TokenTensors.extra[{TOKEN_KL!r}] (token_ops.chunked_token_kl)"
                )
            kl = t.extra[TOKEN_KL]
            loss = loss + self.cfg.asft_lambda * kl
            metrics["kl"] = kl.detach()
        return loss, metrics
