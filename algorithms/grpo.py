"""GRPO and its relatives: the advantage estimator, the aggregation, the clip range,
dual-clip and a KL term are config choices (ALGORITHMS.md section 1)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from rlpost.algorithms.advantages import ADVANTAGES, AdvantageName
from rlpost.algorithms.aggregation import AGGREGATIONS, side_weights
from rlpost.algorithms.base import AlgoConfig, Algorithm, MiniBatchView, Needs, TokenTensors


class GRPOConfig(AlgoConfig):
    advantage: AdvantageName = "grpo"
    std_eps: float = Field(1e-6, gt=0)
    clip_eps_low: float = Field(0.2, ge=0)
    clip_eps_high: float = Field(0.2, ge=0, description="0.28 with eps_low 0.2: DAPO clip-higher")
    dual_clip: float | None = Field(None, gt=1, description="c of dual-clip; None: off")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant",
                      "balanced"] = "token-mean"
    loss_agg_constant: float | None = Field(None, gt=0, description="C of loss_agg 'constant'")
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"

    @model_validator(mode="after")
    def _constant_given(self) -> "GRPOConfig":
        if self.loss_agg == "constant" and self.loss_agg_constant is None:
            raise ValueError("loss_agg 'constant' needs algorithm.loss_agg_constant "
                             "(e.g. max response length x sequences per mini-batch)")
        return self


def clipped_surrogate(log_ratio: torch.Tensor, adv: torch.Tensor, eps_low, eps_high,
                      dual_clip: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)) per token, capped at -c A for
    A < 0 under dual-clip. The clip range may be a float or a per-token tensor."""
    ratio = log_ratio.exp()
    lower = torch.as_tensor(1.0 - eps_low, dtype=ratio.dtype)
    upper = torch.as_tensor(1.0 + eps_high, dtype=ratio.dtype)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, min=lower, max=upper))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    r, lr = ratio.detach(), log_ratio.detach()
    metrics = {
        "clip_frac_low": ((r < lower) & (adv < 0)).float(),
        "clip_frac_high": ((r > upper) & (adv > 0)).float(),
        "ratio_min": r,
        "ratio_max": r,
        # k3 estimate of KL(old || current) on the sampled tokens
        "approx_kl": lr.exp() - 1.0 - lr,
    }
    return loss, metrics


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Estimators of KL(pi_theta || pi_ref) at the sampled token, x = pi_ref / pi_theta."""
    log_x = (ref_logp - logp).clamp(-20.0, 20.0)
    if estimator == "k1":
        return -log_x
    if estimator == "k2":
        return 0.5 * log_x.square()
    return log_x.exp() - log_x - 1.0


class GRPO(Algorithm):
    name = "grpo"
    Config = GRPOConfig

    def __init__(self, cfg: GRPOConfig):
        super().__init__(cfg)
        self.needs = Needs(reference=cfg.kl_coef > 0)

    def advantages(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return ADVANTAGES[self.cfg.advantage](rewards, lengths, self.cfg.std_eps)

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        return AGGREGATIONS[self.cfg.loss_agg](batch, self.cfg.loss_agg_constant)

    def weight_metrics(self, batch: MiniBatchView, weights: torch.Tensor) -> dict[str, float]:
        # token-mean weighs the two sides by token share, BA by response count
        positive, negative = side_weights(batch, weights)
        return {"agg/positive_side_weight": positive, "agg/negative_side_weight": negative}

    def token_loss(self, t: TokenTensors):
        c = self.cfg
        loss, metrics = clipped_surrogate(t.logp - t.old_logp, t.advantages, c.clip_eps_low,
                                          c.clip_eps_high, c.dual_clip)
        return self.add_kl(t, loss, metrics)

    def add_kl(self, t: TokenTensors, loss: torch.Tensor, metrics: dict):
        c = self.cfg
        if c.kl_coef > 0:
            kl = kl_penalty(t.logp, t.ref_logp, c.kl_estimator)
            loss = loss + c.kl_coef * kl
            metrics["kl_ref"] = kl.detach()
        return loss, metrics
