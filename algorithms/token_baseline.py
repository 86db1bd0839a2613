"""The optimal token baseline (arXiv 2602.07078; docs/algorithms.md section 5).

A per-token baseline that minimises the gradient's variance, from the old policy's own
statistics in the log-prob pass (one forward): with pi_j the probability of the sampled
token at j and sum_v pi_j(v)^2 from the same pass, W_t = sum_{j<=t} (1 - 2 pi_j +
sum_v pi_j(v)^2); B_t = sum_i G_t^i W_t^i / (sum_i W_t^i + 1e-8) over the group's
responses that reach position t; A_t = G_t - B_t, not divided by a std. With an outcome
reward alone G_t = R_i, so a response's advantage changes along it only through its
group-mates' weights.
"""

from __future__ import annotations

import torch

from rlpost.algorithms.base import Credit, CreditInputs, Needs
from rlpost.algorithms.credit_base import CreditAlgorithm, CreditConfig
from rlpost.algorithms.token_credit import optimal_token_baseline


class TokenBaseline(CreditAlgorithm):
    name = "optimal_baseline"
    Config = CreditConfig

    def __init__(self, cfg: CreditConfig):
        super().__init__(cfg)
        self.needs = Needs(token_collision=True, **self.regulariser_needs())

    def credit(self, inputs: CreditInputs) -> Credit:
        lengths = inputs.lengths.flatten()
        returns = torch.repeat_interleave(inputs.rewards.flatten().double(), lengths)  # G_t = R_i
        advantages = optimal_token_baseline(
            returns,
            inputs.old_logp.double().exp(),
            inputs.collision.double(),
            lengths,
            inputs.rewards.shape[1],
        )
        return Credit(advantages.float())
