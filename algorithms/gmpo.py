"""GMPO: the geometric mean of the token ratios, clipped token by token in log space
(docs/algorithms.md section 6).

"Geometric-Mean Policy Optimization" (arXiv 2507.20673). With d_t = log r_t, r_t =
pi_theta / pi_old: for A > 0, d~_t = min(d_t, clamp(d_t, -eps, eps)), for A < 0,
d~_t = max(d_t, clamp(d_t, -eps, eps)), and loss_i = -A_i exp(mean_t d~_t), averaged over
the sequences of the mini-batch; eps = 0.4. The clip acts on each token before the mean:
a token whose ratio left the range in the direction its advantage pushes gives no gradient,
the others keep theirs. An outlying token ratio moves a geometric mean far less than the
arithmetic mean GRPO's token-mean amounts to.

Per-token advantages (a decision; the paper has one A_i per response): the clip direction
is the sign of the response's mean advantage Abar_i, and token t carries -A_{i,t}
exp(mean_t d~_t), so that seq-mean-token-mean gives -Abar_i exp(mean_t d~_t) per response:
the paper's loss_i when A is constant within it.

Exact under any split, as GSPO: the means are over one sequence's tokens, and a
micro-batch holds whole sequences; the mean runs over all response tokens of a sequence,
a token mask only decides which tokens weigh.
"""

from __future__ import annotations

import torch
from pydantic import Field

from rlpost.algorithms.advantages import ADVANTAGES, AdvantageName
from rlpost.algorithms.aggregation import aggregate
from rlpost.algorithms.base import AlgoConfig, MiniBatchView, PolicyGradient, TokenTensors
from rlpost.algorithms.policy_loss import ratio_metrics


class GMPOConfig(AlgoConfig):
    advantage: AdvantageName = "grpo"
    std_eps: float = Field(1e-6, gt=0)
    clip_eps: float = Field(0.4, gt=0, description="the log-ratio range [-eps, eps] of each token")


def sequence_mean(x: torch.Tensor, seq_index: torch.Tensor) -> torch.Tensor:
    """The mean of x over each sequence's tokens, given back per token [T]."""
    n = int(seq_index.max()) + 1 if seq_index.numel() else 0
    total = x.new_zeros(n).index_add(0, seq_index, x)
    count = x.new_zeros(n).index_add(0, seq_index, torch.ones_like(x))
    return (total / count)[seq_index]


def gmpo_token_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, seq_index: torch.Tensor, eps: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-A_{i,t} exp(mean_t d~_t) per token [T], d~ clipped by the sign of the sequence's mean
    advantage (neither bound when it is 0: the loss is then 0 or, with per-token advantages,
    unclipped), and per-token metrics."""
    d = logp - old_logp
    mean_adv = sequence_mean(adv.detach().to(d.dtype), seq_index)
    clipped_high = (mean_adv > 0) & (d.detach() > eps)  # A > 0: min(d, clamp(d)) caps d at eps
    clipped_low = (mean_adv < 0) & (d.detach() < -eps)  # A < 0: max(d, clamp(d)) floors d at -eps
    d_tilde = torch.where(
        clipped_high, torch.full_like(d, eps), torch.where(clipped_low, torch.full_like(d, -eps), d)
    )
    seq_ratio = sequence_mean(d_tilde, seq_index).exp()
    metrics = {
        **ratio_metrics(d),
        "clip_frac_low": clipped_low.float(),
        "clip_frac_high": clipped_high.float(),
        "geo_ratio": seq_ratio.detach(),
    }
    return -adv * seq_ratio, metrics


class GMPO(PolicyGradient):
    name = "gmpo"
    Config = GMPOConfig

    def advantages(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return ADVANTAGES[self.cfg.advantage](rewards, lengths, self.cfg.std_eps)

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        return aggregate("seq-mean-token-mean", batch)

    def token_loss(self, t: TokenTensors):
        return gmpo_token_loss(t.logp, t.old_logp, t.advantages, t.seq_index, self.cfg.clip_eps)
