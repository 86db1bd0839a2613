"""What the algorithms of credit beyond the outcome share (docs/algorithms.md section 5).

PPO with a critic, VinePPO, process rewards (PURE), PRIME and the optimal token baseline
differ only in how they give each token its advantage (`PolicyGradient.credit`, from what
their `Needs` ask the runtime to compute over the whole rollout batch). Their loss is PPO's
clipped surrogate on those per-token advantages, with the KL and entropy terms and the
aggregation of GRPO's config, so a comparison between them changes the credit alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlpost.algorithms.aggregation import aggregate
from rlpost.algorithms.base import AlgoConfig, MiniBatchView, PolicyGradient, TokenTensors
from rlpost.algorithms.grpo import add_regularisers, clipped_surrogate

# per-token advantages have no one sign per response: "balanced" (which splits a group by
# the sign of A_i) does not apply
CreditAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


class CreditConfig(AlgoConfig):
    clip_eps_low: float = Field(0.2, ge=0)
    clip_eps_high: float = Field(0.2, ge=0)
    dual_clip: float | None = Field(None, gt=1, description="c of dual-clip; None: off")
    loss_agg: CreditAggregation = "token-mean"
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus: loss -= coef * H per token")


class CreditAlgorithm(PolicyGradient):
    """PPO's clipped surrogate on per-token advantages; subclasses give `credit` and set
    their `needs` (`credit_needs` adds the KL's and the entropy bonus's)."""

    Config = CreditConfig

    def regulariser_needs(self) -> dict[str, bool]:
        return {"reference": self.cfg.kl_coef > 0, "entropy_grad": self.cfg.entropy_coef > 0}

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        return aggregate(self.cfg.loss_agg, batch)

    def token_loss(self, t: TokenTensors):
        c = self.cfg
        loss, metrics = clipped_surrogate(
            t.logp - t.old_logp, t.advantages, c.clip_eps_low, c.clip_eps_high, c.dual_clip
        )
        return add_regularisers(c, t, loss, metrics)


def outcome_at_end(rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Token rewards [T] holding each response's outcome reward on its last token (flat,
    in sequence order; rewards and lengths [P, G])."""
    sizes = lengths.flatten().tolist()
    out = torch.zeros(sum(sizes), dtype=torch.float64)
    ends = torch.tensor(sizes).cumsum(0) - 1
    has_tokens = torch.tensor(sizes) > 0
    out[ends[has_tokens]] = rewards.flatten().double()[has_tokens]
    return out
