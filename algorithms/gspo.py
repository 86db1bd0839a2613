"""GSPO: a sequence-level importance ratio in PPO's clipped surrogate (docs/algorithms.md section 6).

"Group Sequence Policy Optimization" (arXiv 2507.18071). With r_t = pi_theta / pi_old:
s_i = exp(mean_t log r_{i,t}) over the response tokens of o_i (length-normalised, so one
ratio per sequence whatever its length), loss_i = -min(s_i A_i, clip(s_i, 1 - eps_l,
1 + eps_h) A_i), averaged over the sequences of the mini-batch; eps_l = 3e-4, eps_h = 4e-4
(the ratio is a geometric mean, so it moves far less than a token's). A_i: GRPO's.

Exact under any split: the sequence mean needs all of a sequence's tokens, and a
micro-batch holds whole sequences (`data.batch.plan` assigns sequences, never cuts one),
so `token_loss` takes s_i over `seq_index` within its micro-batch. Every token of o_i then
carries loss_i, and seq-mean-token-mean weights 1 / (S |o_i|) sum it to loss_i / S.
A token mask (e.g. `rollout.mask_truncated`) decides which tokens weigh, not s_i: a
sequence's ratio is over all its tokens.

GSPO-token (`algorithm.name: gspo_token`): the per-token ratio s_{i,t} = sg(s_i)
pi_theta(y_t) / sg(pi_theta(y_t)), whose value is s_i and whose gradient is s_i grad log
pi_theta(y_t), in the same clipped surrogate with each token's own A_{i,t}. With A constant
within a response its loss and gradient are GSPO's; it differs when advantages are per token.
"""

from __future__ import annotations

import torch
from pydantic import Field

from rlpost.algorithms.advantages import ADVANTAGES, AdvantageName
from rlpost.algorithms.aggregation import aggregate
from rlpost.algorithms.base import AlgoConfig, MiniBatchView, PolicyGradient, TokenTensors
from rlpost.algorithms.grpo import clipped_surrogate


class GSPOConfig(AlgoConfig):
    advantage: AdvantageName = "grpo"
    std_eps: float = Field(1e-6, gt=0)
    clip_eps_low: float = Field(3e-4, ge=0, description="eps_l on the sequence ratio s_i")
    clip_eps_high: float = Field(4e-4, ge=0, description="eps_h on the sequence ratio s_i")


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, seq_index: torch.Tensor) -> torch.Tensor:
    """log s_i = mean_t (logp - old_logp) over each sequence's tokens, given back per token [T]."""
    log_ratio = logp - old_logp
    n = int(seq_index.max()) + 1 if seq_index.numel() else 0
    total = log_ratio.new_zeros(n).index_add(0, seq_index, log_ratio)
    count = log_ratio.new_zeros(n).index_add(0, seq_index, torch.ones_like(log_ratio))
    return (total / count)[seq_index]


class GSPO(PolicyGradient):
    name = "gspo"
    Config = GSPOConfig

    def advantages(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return ADVANTAGES[self.cfg.advantage](rewards, lengths, self.cfg.std_eps)

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        return aggregate("seq-mean-token-mean", batch)

    def log_ratio(self, t: TokenTensors) -> torch.Tensor:
        """log s_i per token: the ratio the clip acts on."""
        return sequence_log_ratio(t.logp, t.old_logp, t.seq_index)

    def token_loss(self, t: TokenTensors):
        c = self.cfg
        loss, metrics = clipped_surrogate(
            self.log_ratio(t), t.advantages, c.clip_eps_low, c.clip_eps_high, None
        )
        # ratio_* and clip_frac_* are of s_i (per token of o_i); approx_kl stays per token,
        # comparable with the token-level algorithms'
        lr = (t.logp - t.old_logp).detach()
        metrics["approx_kl"] = lr.exp() - 1.0 - lr
        return loss, metrics


def token_level_log_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, seq_index: torch.Tensor
) -> torch.Tensor:
    """log s_{i,t} = sg(log s_i) + log pi_theta(y_t) - sg(log pi_theta(y_t)): the value of
    log s_i, the gradient of log pi_theta(y_t) alone."""
    return sequence_log_ratio(logp, old_logp, seq_index).detach() + logp - logp.detach()


class GSPOToken(GSPO):
    """GSPO-token: GSPO's config and aggregation, the ratio s_{i,t} per token."""

    name = "gspo_token"

    def log_ratio(self, t: TokenTensors) -> torch.Tensor:
        return token_level_log_ratio(t.logp, t.old_logp, t.seq_index)
