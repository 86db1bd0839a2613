"""VinePPO: Monte-Carlo values at step boundaries (arXiv 2410.01679; docs/algorithms.md section 5).

V_hat(s_k) is the mean reward of K independent continuations the rollout engines sample
from the prefix that ends at step boundary k (K = 9, at the training temperature); the
tokens of step k carry A_k = V_hat(s_{k+1}) - V_hat(s_k), the last step's R - V_hat(s_K)
(gamma = 1, V at the terminal state 0). Steps come from `step_credit.split` (default:
newlines); `max_boundaries` caps the steps per response, adjacent ones merged evenly
(`step_credit.merge_steps`), which bounds the extra generation at K x max_boundaries
continuations per response.

Decision: V_hat(s_0), the prompt's value, is the leave-one-out mean reward of the other
G - 1 responses of the group: they are independent samples from the same state at the
same temperature, so this is the same estimator at no extra generation (the paper samples
K more). A continuation is cut where the response's own length budget would end
(rollout.max_new_tokens counts the prefix), so V_hat is the value under that budget.
"""

from __future__ import annotations

from pydantic import Field

from rlpost.algorithms.base import Credit, CreditInputs, Needs
from rlpost.algorithms.credit_base import CreditAlgorithm, CreditConfig
from rlpost.algorithms.step_credit import vine_advantages


class VinePPOConfig(CreditConfig):
    continuations: int = Field(9, gt=0, description="K: continuations sampled per step boundary")
    max_boundaries: int | None = Field(
        8, gt=0, description="at most this many steps per response (adjacent steps merged); None: every step"
    )


class VinePPO(CreditAlgorithm):
    name = "vineppo"
    Config = VinePPOConfig

    def __init__(self, cfg: VinePPOConfig):
        super().__init__(cfg)
        self.needs = Needs(
            continuations=cfg.continuations, max_boundaries=cfg.max_boundaries, **self.regulariser_needs()
        )

    def credit(self, inputs: CreditInputs) -> Credit:
        advantages = vine_advantages(
            inputs.state_values, inputs.step_ends, inputs.lengths.flatten(), inputs.rewards.flatten().double()
        )
        return Credit(advantages.float())
