"""SAPO: a soft, temperature-controlled gate in place of the hard clip (docs/algorithms.md
section 6).

"Soft Adaptive Policy Optimization" (arXiv 2511.20347). With r_t = pi_theta / pi_old,
f(r) = sigmoid(tau (r - 1)) 4 / tau and l_t = -f(r_t) A_t, no clip; tau = `tau_pos` (1.0)
for A_t > 0 and `tau_neg` (1.05) for A_t < 0. f'(r) = 4 sigmoid(tau (r - 1))
(1 - sigmoid(tau (r - 1))): 1 at r = 1, so on-policy the gradient is the plain policy
gradient, and it decays smoothly (never to exactly 0) as r leaves 1, faster for larger tau
(the negative side, whose updates spread to many other tokens' probabilities).
Aggregation and advantages from config (`policy_loss`, token-mean by default); exact under
any split because l_t depends on its own token only.
"""

from __future__ import annotations

import torch
from pydantic import Field

from rlpost.algorithms.base import TokenTensors
from rlpost.algorithms.policy_loss import PolicyLoss, PolicyLossConfig, ratio_metrics


class SAPOConfig(PolicyLossConfig):
    tau_pos: float = Field(1.0, gt=0, description="the gate's temperature for A > 0")
    tau_neg: float = Field(1.05, gt=0, description="the gate's temperature for A < 0")


def sapo_token_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, tau_pos: float, tau_neg: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-sigmoid(tau (r - 1)) 4 / tau * A per token, tau by the sign of A (tau_pos at A = 0,
    whose loss is 0), and per-token metrics: `gate_weight` f'(r), the gate's factor on the
    unclipped gradient -A grad r."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    tau = torch.where(adv < 0, tau_neg, tau_pos).to(ratio.dtype)
    gate = torch.sigmoid(tau * (ratio - 1.0))
    g = gate.detach()
    metrics = {**ratio_metrics(log_ratio), "gate_weight": 4.0 * g * (1.0 - g)}
    return -gate * (4.0 / tau) * adv, metrics


class SAPO(PolicyLoss):
    name = "sapo"
    Config = SAPOConfig

    def token_loss(self, t: TokenTensors):
        return sapo_token_loss(t.logp, t.old_logp, t.advantages, self.cfg.tau_pos, self.cfg.tau_neg)
