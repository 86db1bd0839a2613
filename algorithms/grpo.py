"""GRPO and its relatives: the advantage estimator, the aggregation, the clip range,
dual-clip, a KL term, an entropy bonus and token / sample selection are config
choices (docs/algorithms.md section 1)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from rlpost.algorithms.advantages import ADVANTAGES, AdvantageName
from rlpost.algorithms.aggregation import aggregate, side_weights
from rlpost.algorithms.base import AlgoConfig, Conditional, MiniBatchView, Needs, PolicyGradient, TokenTensors
from rlpost.algorithms.selection import (
    d3s_token_mask,
    entropy_quantile_mask,
    linear_schedule,
    max_variance_subset,
    position_weights,
    subset_size,
)


class D3SConfig(AlgoConfig):
    """D3S schedule: fractions move linearly from *_start (aggressive) at RL step 1 to
    *_end (mild) after schedule_steps steps. The paper does not publish its endpoints;
    these defaults are ours. A level whose start and end are both 1 is off."""

    sample_frac_start: float = Field(0.5, gt=0, le=1, description="N / G kept per group at step 1")
    sample_frac_end: float = Field(1.0, gt=0, le=1)
    token_frac_start: float = Field(0.5, gt=0, le=1, description="K: fraction of tokens kept by |A| H")
    token_frac_end: float = Field(1.0, gt=0, le=1)
    schedule_steps: int = Field(100, gt=0, description="RL steps from the start to the end values")


class GRPOConfig(AlgoConfig):
    advantage: AdvantageName = "grpo"
    std_eps: float = Field(1e-6, gt=0)
    clip_eps_low: float = Field(0.2, ge=0)
    clip_eps_high: float = Field(0.2, ge=0, description="0.28 with eps_low 0.2: DAPO clip-higher")
    dual_clip: float | None = Field(None, gt=1, description="c of dual-clip; None: off")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant", "balanced"] = (
        "token-mean"
    )
    loss_agg_constant: float | None = Field(None, gt=0, description="C of loss_agg 'constant'")
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus: loss -= coef * H per token")
    selection: Literal["none", "d3s", "entropy_mask"] = "none"
    d3s: D3SConfig = Field(default_factory=D3SConfig)
    entropy_mask_rho: float = Field(
        0.2, gt=0, le=1, description="entropy_mask keeps H >= the (1 - rho) quantile over the rollout batch"
    )
    tw_alpha: float | None = Field(
        None, ge=1, description="TW-GRPO position weights in [1, tw_alpha] (1.7 in the paper); None: off"
    )

    conditionals = tuple(
        Conditional(key, "selection", (method,), f"set algorithm.selection: {method}")
        for key, method in (("d3s", "d3s"), ("entropy_mask_rho", "entropy_mask"))
    )

    @model_validator(mode="after")
    def _constant_given(self) -> GRPOConfig:
        if self.loss_agg == "constant" and self.loss_agg_constant is None:
            raise ValueError(
                "loss_agg 'constant' needs algorithm.loss_agg_constant "
                "(e.g. max response length x sequences per mini-batch)"
            )
        return self


def clipped_surrogate(
    log_ratio: torch.Tensor, adv: torch.Tensor, eps_low, eps_high, dual_clip: float | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)) per token, capped at -c A for
    A < 0 under dual-clip. The clip range may be a float or a per-token tensor."""
    ratio = log_ratio.exp()
    lower = torch.as_tensor(1.0 - eps_low, dtype=ratio.dtype, device=ratio.device)
    upper = torch.as_tensor(1.0 + eps_high, dtype=ratio.dtype, device=ratio.device)
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


class GRPO(PolicyGradient):
    name = "grpo"
    Config = GRPOConfig

    def __init__(self, cfg: GRPOConfig):
        super().__init__(cfg)
        self.needs = Needs(
            reference=cfg.kl_coef > 0,
            entropy_grad=cfg.entropy_coef > 0,
            position_divergence=cfg.tw_alpha is not None,
            old_policy_entropy=cfg.selection in ("d3s", "entropy_mask"),
        )

    def advantages(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return ADVANTAGES[self.cfg.advantage](rewards, lengths, self.cfg.std_eps)

    def select_samples(self, advantages: torch.Tensor, step: int) -> torch.Tensor | None:
        if self.cfg.selection != "d3s":
            return None
        d = self.cfg.d3s
        frac = linear_schedule(d.sample_frac_start, d.sample_frac_end, d.schedule_steps, step)
        return max_variance_subset(advantages, subset_size(frac, advantages.shape[1]))

    def token_mask(
        self, entropy: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor | None, step: int
    ) -> torch.Tensor | None:
        c = self.cfg
        if c.selection == "d3s":
            d = c.d3s
            frac = linear_schedule(d.token_frac_start, d.token_frac_end, d.schedule_steps, step)
            return d3s_token_mask(advantages, entropy, frac, valid)
        if c.selection == "entropy_mask":
            return entropy_quantile_mask(entropy, c.entropy_mask_rho, valid)
        return valid

    def position_weights(self, divergence: torch.Tensor) -> torch.Tensor:
        return position_weights(divergence, self.cfg.tw_alpha)

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        """The aggregation's weights; TW-GRPO's position weights multiply them and leave
        its normalisers (token / sequence counts) as they are (a decision: the paper
        weights each token's term of the GRPO objective)."""
        weights = aggregate(self.cfg.loss_agg, batch, self.cfg.loss_agg_constant)
        return weights if batch.token_scale is None else weights * batch.token_scale

    def weight_metrics(self, batch: MiniBatchView, weights: torch.Tensor) -> dict[str, float]:
        # token-mean weighs the two sides by token share, BA by response count
        positive, negative = side_weights(batch, weights)
        return {"agg/positive_side_weight": positive, "agg/negative_side_weight": negative}

    def token_loss(self, t: TokenTensors):
        c = self.cfg
        loss, metrics = clipped_surrogate(
            t.logp - t.old_logp, t.advantages, c.clip_eps_low, c.clip_eps_high, c.dual_clip
        )
        return self.add_regularisers(t, loss, metrics)

    def add_regularisers(self, t: TokenTensors, loss: torch.Tensor, metrics: dict):
        return add_regularisers(self.cfg, t, loss, metrics)


def add_regularisers(c, t: TokenTensors, loss: torch.Tensor, metrics: dict):
    """The KL penalty to the reference policy and the entropy bonus of config `c` (its
    kl_coef, kl_estimator, entropy_coef), per token."""
    if c.kl_coef > 0:
        kl = kl_penalty(t.logp, t.ref_logp, c.kl_estimator)
        loss = loss + c.kl_coef * kl
        metrics["kl_ref"] = kl.detach()
    if c.entropy_coef > 0:
        loss = loss - c.entropy_coef * t.entropy
    return loss, metrics
