"""PPO with a learned value: GAE over the critic's values (docs/algorithms.md section 5).

delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = sum_l (gamma lambda)^l delta_{t+l}, with the
outcome reward on the last token (r_t = 0 before it) and V after the last token 0; the
critic regresses on R_t = A_t + V(s_t) (`Credit.returns`, the clipped value loss of
rlpost/workers/critic.py). Defaults gamma = 1, lambda = 0.95 (a decision: LLM RL recipes
use gamma 1 and lambda 0.95-1). The advantages are then whitened over the rollout batch's
tokens, as verl and OpenRLHF do by default (`whiten: false` keeps them raw); the returns
are not.

The runtime starts the critic (its own DeepSpeed group, `critic:` section) because `needs`
asks for values, computes V(s_t) for every response token of the batch before the
advantages, and trains the critic after the policy's update.
"""

from __future__ import annotations

import math

from pydantic import Field

from rlpost.algorithms.base import Credit, CreditInputs, Needs
from rlpost.algorithms.credit_base import CreditAlgorithm, CreditConfig, outcome_at_end
from rlpost.algorithms.token_credit import explained_variance, gae, whiten


class PPOConfig(CreditConfig):
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda")
    whiten: bool = Field(True, description="advantages to zero mean, unit std over the batch's tokens")


class PPO(CreditAlgorithm):
    name = "ppo"
    Config = PPOConfig

    def __init__(self, cfg: PPOConfig):
        super().__init__(cfg)
        self.needs = Needs(values=True, **self.regulariser_needs())

    def credit(self, inputs: CreditInputs) -> Credit:
        lengths = inputs.lengths.flatten()
        rewards = outcome_at_end(inputs.rewards, inputs.lengths)
        values = inputs.values.double()
        advantages, returns = gae(rewards, values, lengths, self.cfg.gamma, self.cfg.lam)
        metrics = {"critic/return_mean": returns.mean().item() if returns.numel() else 0.0}
        ev = explained_variance(values, returns)
        if not math.isnan(ev):  # all returns equal (or none): nothing to explain
            metrics["critic/explained_variance"] = ev
        if self.cfg.whiten:
            advantages = whiten(advantages)
        return Credit(advantages.float(), returns.float(), metrics)
