"""CISPO: clipped importance-sampling weights, not clipped updates (docs/algorithms.md section 6).

MiniMax-M1 (arXiv 2506.13585). With r_t = pi_theta / pi_old, each token's loss is
l_t = -sg(clip(r_t, 1 - eps_l, 1 + eps_h)) A_t log pi_theta(y_t): the ratio is only a weight,
capped, and the gradient -sg(w_t) A_t grad log pi_theta never vanishes, whereas PPO's clip
gives no gradient to a token outside the range. Aggregated token-mean by default ("/ token
count"). Defaults (a decision, as TRL and AReaL): no lower bound (eps_l None) and
eps_h = 4, so the weight caps at 5. Exact under any split: l_t depends on its own token only
and the aggregation weights are fixed over the whole mini-batch (`policy_loss`).
"""

from __future__ import annotations

import torch
from pydantic import Field

from rlpost.algorithms.base import TokenTensors
from rlpost.algorithms.policy_loss import PolicyLoss, PolicyLossConfig, ratio_metrics


class CISPOConfig(PolicyLossConfig):
    clip_eps_low: float | None = Field(
        None, ge=0, description="the weight's lower bound 1 - eps_l; None: no lower bound"
    )
    clip_eps_high: float | None = Field(
        4.0, ge=0, description="the weight's upper bound 1 + eps_h (4: capped at 5); None: no cap"
    )


def cispo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    eps_low: float | None,
    eps_high: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi_theta per token (a bound of None is
    absent), and per-token metrics: the fractions whose weight hit each bound (whatever the
    sign of A: the weight is clipped for every token), the weight itself, the ratio's."""
    log_ratio = logp - old_logp
    ratio = log_ratio.detach().exp()
    lower = None if eps_low is None else 1.0 - eps_low
    upper = None if eps_high is None else 1.0 + eps_high
    weight = ratio if lower is None and upper is None else ratio.clamp(min=lower, max=upper)
    loss = -weight * adv * logp
    metrics = {
        **ratio_metrics(log_ratio),
        "clip_frac_low": (ratio < lower).float() if lower is not None else torch.zeros_like(ratio),
        "clip_frac_high": (ratio > upper).float() if upper is not None else torch.zeros_like(ratio),
        "is_weight": weight,
    }
    return loss, metrics


class CISPO(PolicyLoss):
    name = "cispo"
    Config = CISPOConfig

    def token_loss(self, t: TokenTensors):
        return cispo_token_loss(
            t.logp, t.old_logp, t.advantages, self.cfg.clip_eps_low, self.cfg.clip_eps_high
        )
