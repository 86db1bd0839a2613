"""What the token-level policy losses of docs/algorithms.md section 6 share: the advantage
estimator, an aggregation from config, and the ratio metrics every RL step reports.

CISPO, SAPO and the DPPO trust-region mask each change only the per-token loss l_t of
r_t = pi_theta / pi_old; the mini-batch loss is sum_t w_t l_t with GRPO's aggregation
weights (`aggregation.aggregate`, computed over the whole optimizer-step mini-batch), so
they are exact under any split into micro-batches and learner ranks by construction.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlpost.algorithms.advantages import ADVANTAGES, AdvantageName
from rlpost.algorithms.aggregation import aggregate
from rlpost.algorithms.base import AlgoConfig, MiniBatchView, PolicyGradient

# the aggregations that need no constant from the config (docs/algorithms.md section 1)
TokenAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "balanced"]


class PolicyLossConfig(AlgoConfig):
    advantage: AdvantageName = "grpo"
    std_eps: float = Field(1e-6, gt=0)
    loss_agg: TokenAggregation = "token-mean"


def ratio_metrics(log_ratio: torch.Tensor) -> dict[str, torch.Tensor]:
    """ratio_min / ratio_max of r_t and the k3 estimate of KL(old || current) per token,
    named as GRPO names them so that runs compare."""
    lr = log_ratio.detach()
    r = lr.exp()
    return {"ratio_min": r, "ratio_max": r, "approx_kl": r - 1.0 - lr}


class PolicyLoss(PolicyGradient):
    """A PolicyGradient whose advantages and aggregation come from `PolicyLossConfig`;
    subclasses give `token_loss`."""

    Config = PolicyLossConfig

    def advantages(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return ADVANTAGES[self.cfg.advantage](rewards, lengths, self.cfg.std_eps)

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        return aggregate(self.cfg.loss_agg, batch)
