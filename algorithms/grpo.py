"""GRPO: group-normalised advantages, PPO clipped surrogate, KL to a reference."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlpost.algorithms.aggregation import AGGREGATIONS
from rlpost.algorithms.base import AlgoConfig, Algorithm, MiniBatchView, Needs, TokenTensors


class GRPOConfig(AlgoConfig):
    clip_eps_low: float = Field(0.2, ge=0)
    clip_eps_high: float = Field(0.2, ge=0)
    dual_clip: float | None = Field(None, gt=1, description="c of dual-clip; None: off")
    std_eps: float = Field(1e-6, gt=0)
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"


def group_normalised_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """(r - mean_g r) / (std_g r + eps) per row; std with Bessel's correction (as TRL
    and verl compute it). A group of one has advantage 0."""
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


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

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return group_normalised_advantages(rewards, self.cfg.std_eps)

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        return AGGREGATIONS[self.cfg.loss_agg](batch)

    def token_loss(self, t: TokenTensors):
        c = self.cfg
        adv = t.advantages
        log_ratio = t.logp - t.old_logp
        ratio = log_ratio.exp()
        clipped = ratio.clamp(1.0 - c.clip_eps_low, 1.0 + c.clip_eps_high)
        loss = torch.maximum(-adv * ratio, -adv * clipped)
        if c.dual_clip is not None:
            loss = torch.where(adv < 0, torch.minimum(loss, -c.dual_clip * adv), loss)
        metrics = {
            "clip_frac_low": ((ratio < 1.0 - c.clip_eps_low) & (adv < 0)).float(),
            "clip_frac_high": ((ratio > 1.0 + c.clip_eps_high) & (adv > 0)).float(),
            "ratio_min": ratio.detach(),
            "ratio_max": ratio.detach(),
            # k3 estimate of KL(old || current) on the sampled tokens
            "approx_kl": (log_ratio.detach().exp() - 1.0 - log_ratio.detach()),
        }
        if c.kl_coef > 0:
            kl = kl_penalty(t.logp, t.ref_logp, c.kl_estimator)
            loss = loss + c.kl_coef * kl
            metrics["kl_ref"] = kl.detach()
        return loss, metrics
