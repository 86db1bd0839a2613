"""DPPO's trust-region mask: PPO's ratio clip replaced by a bound on the change of the sampled
token's probability (docs/algorithms.md section 6).

"Rethinking the Trust Region in LLM Reinforcement Learning" (arXiv 2602.04879), the
Binary-TV variant: with p = pi_theta(y_t) and p_old = pi_old(y_t), token t is masked (no
gradient) when p - p_old > eps_h and A_t > 0, or p - p_old < -eps_l and A_t < 0. Unmasked
tokens take the unclipped surrogate l_t = -r_t A_t, masked ones its value without gradient,
-sg(r_t) A_t. A difference of probabilities is the total variation between the two policies
restricted to {y_t, everything else}: a rare token may change its ratio a lot at little
divergence (PPO's clip stops it, this mask does not), and a likely token may move far with a
ratio near 1. Since |p - p_old| <= p_old |r - 1|, a bound eps masks only tokens PPO's clip
at the same eps would also stop; only a tighter bound reaches the likely tokens PPO lets
through.

Aggregation and advantages from config (`policy_loss`, token-mean by default); exact under
any split because l_t depends on its own token only.
"""

from __future__ import annotations

import torch
from pydantic import Field

from rlpost.algorithms.base import TokenTensors
from rlpost.algorithms.policy_loss import PolicyLoss, PolicyLossConfig, ratio_metrics


class DPPOConfig(PolicyLossConfig):
    delta_low: float = Field(0.2, gt=0, le=1, description="eps_l: the largest fall of p where A < 0")
    delta_high: float = Field(0.2, gt=0, le=1, description="eps_h: the largest rise of p where A > 0")


def trust_region_mask(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, delta_low: float, delta_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked where A > 0, masked where A < 0, p - p_old), without gradient."""
    diff = logp.detach().exp() - old_logp.exp()
    return (adv > 0) & (diff > delta_high), (adv < 0) & (diff < -delta_low), diff


def dppo_token_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, delta_low: float, delta_high: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-r A per token, its gradient dropped where the trust-region mask fires, and per-token
    metrics: the masked fractions per side (as GRPO's clip fractions) and p - p_old."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    high, low, diff = trust_region_mask(logp, old_logp, adv, delta_low, delta_high)
    kept = torch.where(high | low, ratio.detach(), ratio)
    metrics = {
        **ratio_metrics(log_ratio),
        "clip_frac_high": high.float(),
        "clip_frac_low": low.float(),
        "prob_diff_min": diff,
        "prob_diff_max": diff,
    }
    return -kept * adv, metrics


class DPPO(PolicyLoss):
    name = "dppo"
    Config = DPPOConfig

    def token_loss(self, t: TokenTensors):
        return dppo_token_loss(t.logp, t.old_logp, t.advantages, self.cfg.delta_low, self.cfg.delta_high)
