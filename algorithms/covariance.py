"""Clip-Cov and KL-Cov: restrain the few tokens whose log-probability and advantage covary
most (docs/algorithms.md section 6).

"The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
(arXiv 2505.22617): the policy's entropy falls with the covariance between a token's
log-probability and its advantage, and a small set of high-covariance tokens drives the
collapse. Cov_t = (log pi_t - mean log pi)(A_t - mean A), the means over the tokens of the
whole optimizer-step mini-batch (a decision, for exactness; the authors centre per
micro-batch). The base loss is -A_t r_t, without a clip.

- Clip-Cov (`clip_cov`): among the tokens with `cov_low` < Cov_t < `cov_high` (1, 5), pick
  round(`pick_frac` N) at random (2e-4; N the mini-batch's tokens) and give them no gradient:
  their aggregation weight is 0 and they stay in every normaliser.
- KL-Cov (`kl_cov`): the round(`top_frac` N) tokens of largest Cov_t (2e-3) take
  -A_t r_t + `beta` |log r_t| (beta 1), the others -A_t r_t.

Exact under any split: Cov, the pick and the top tokens are computed on the controller over
the whole mini-batch before it is cut (`token_weights`, `minibatch_inputs`). Decisions:
- log pi_t is the old policy's (the log-prob pass; `needs.old_policy_entropy` asks the
  runtime for it before the update), which is the current policy's at the first optimizer
  step of each rollout batch. The current policy's over the whole mini-batch would need a
  forward pass over all of it before any backward.
- Clip-Cov's random pick is seeded from `pick_seed` and the mini-batch itself (its
  sequences' groups, lengths and advantages, all fixed before the update): the same
  mini-batch gets the same pick on any split, and in a resumed run. The runtime hands
  `token_weights` neither the run's seed nor the step.
- round(x) is floor(x + 0.5); tokens a token mask leaves out of the loss take no part (not
  in N, never picked); ties in Cov go to the earlier token.
"""

from __future__ import annotations

import hashlib
import math

import torch
from pydantic import Field, model_validator

from rlpost.algorithms.aggregation import aggregate
from rlpost.algorithms.base import MiniBatchView, Needs, TokenTensors
from rlpost.algorithms.policy_loss import PolicyLoss, PolicyLossConfig, ratio_metrics

KL_COV_SELECTED = "kl_cov_selected"  # the token-input key of KL-Cov's top tokens (float 0 / 1)


def _kept(batch: MiniBatchView) -> torch.Tensor:
    n = batch.seq_index.numel()
    return torch.ones(n, dtype=torch.bool) if batch.token_mask is None else batch.token_mask.bool()


def token_covariance(batch: MiniBatchView, name: str) -> torch.Tensor:
    """Cov_t over the kept tokens of the mini-batch (float64, [T]; 0 on the others)."""
    if batch.old_logp is None:
        raise ValueError(
            f"algorithm {name!r} needs the old policy's log-probs on the controller before the "
            "update (MiniBatchView.old_logp); the runtime gives them when needs.old_policy_entropy"
        )
    kept = _kept(batch)
    logp, adv = batch.old_logp.double(), batch.advantages.double()
    cov = torch.zeros_like(logp)
    if kept.any():
        lp, a = logp[kept], adv[kept]
        cov[kept] = (lp - lp.mean()) * (a - a.mean())
    return cov


def rounded_count(frac: float, n: int) -> int:
    return math.floor(frac * n + 0.5)


def batch_seed(batch: MiniBatchView, seed: int) -> int:
    """A seed from `seed` and what fixes the mini-batch before the update: its sequences'
    groups and lengths and the tokens' advantages."""
    h = hashlib.sha256(str(seed).encode())
    for x in (batch.group_index.long(), batch.lengths.long(), batch.advantages.double()):
        h.update(x.contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") & (2**63 - 1)


def clip_cov_pick(cov: torch.Tensor, kept: torch.Tensor, frac: float, low: float, high: float, seed: int):
    """(picked, candidates): bool [T] masks; round(frac N) of the candidates (low < Cov < high),
    drawn without replacement with a generator seeded by `seed` (all, if fewer)."""
    candidates = kept & (cov > low) & (cov < high)
    idx = candidates.nonzero().squeeze(1)
    count = min(rounded_count(frac, int(kept.sum())), idx.numel())
    order = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))
    picked = torch.zeros_like(kept)
    picked[idx[order[:count]]] = True
    return picked, candidates


def kl_cov_top(cov: torch.Tensor, kept: torch.Tensor, frac: float) -> torch.Tensor:
    """The round(frac N) kept tokens of largest Cov (ties to the earlier token), bool [T]."""
    idx = kept.nonzero().squeeze(1)
    count = rounded_count(frac, idx.numel())
    top = torch.sort(cov[idx], descending=True, stable=True).indices[:count]
    selected = torch.zeros_like(kept)
    selected[idx[top]] = True
    return selected


def surrogate(t: TokenTensors) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """-A r per token (no clip), log r, and the ratio metrics."""
    log_ratio = t.logp - t.old_logp
    return -t.advantages * log_ratio.exp(), log_ratio, ratio_metrics(log_ratio)


class ClipCovConfig(PolicyLossConfig):
    pick_frac: float = Field(2e-4, gt=0, le=1, description="r: round(r N) tokens lose their gradient")
    cov_low: float = Field(1.0, description="candidates have cov_low < Cov_t < cov_high")
    cov_high: float = Field(5.0)
    pick_seed: int = Field(0, ge=0, description="with the mini-batch, seeds the random pick")

    @model_validator(mode="after")
    def _range(self) -> ClipCovConfig:
        if not self.cov_low < self.cov_high:
            raise ValueError(
                f"algorithm.cov_low ({self.cov_low}) must be below algorithm.cov_high ({self.cov_high})"
            )
        return self


class ClipCov(PolicyLoss):
    name = "clip_cov"
    Config = ClipCovConfig
    needs = Needs(old_policy_entropy=True)  # the controller reads the old log-probs

    def pick(self, batch: MiniBatchView) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        cov = token_covariance(batch, self.name)
        return clip_cov_pick(
            cov, _kept(batch), c.pick_frac, c.cov_low, c.cov_high, batch_seed(batch, c.pick_seed)
        )

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        weights = aggregate(self.cfg.loss_agg, batch)
        picked, _ = self.pick(batch)
        return weights.masked_fill(picked, 0.0)

    def weight_metrics(self, batch: MiniBatchView, weights: torch.Tensor) -> dict[str, float]:
        picked, candidates = self.pick(batch)  # the same pick again: it depends on the batch alone
        n = max(int(_kept(batch).sum()), 1)
        return {"cov/picked_frac": int(picked.sum()) / n, "cov/candidate_frac": int(candidates.sum()) / n}

    def token_loss(self, t: TokenTensors):
        loss, _, metrics = surrogate(t)
        return loss, metrics


class KLCovConfig(PolicyLossConfig):
    top_frac: float = Field(2e-3, gt=0, le=1, description="k: the round(k N) tokens of largest Cov")
    beta: float = Field(1.0, ge=0, description="coefficient of |log r| on those tokens")


class KLCov(PolicyLoss):
    name = "kl_cov"
    Config = KLCovConfig
    needs = Needs(old_policy_entropy=True)  # the controller reads the old log-probs

    def minibatch_inputs(self, batch: MiniBatchView) -> dict[str, torch.Tensor]:
        cov = token_covariance(batch, self.name)
        return {KL_COV_SELECTED: kl_cov_top(cov, _kept(batch), self.cfg.top_frac).to(torch.float32)}

    def token_loss(self, t: TokenTensors):
        loss, log_ratio, metrics = surrogate(t)
        selected = t.extra[KL_COV_SELECTED].to(loss.dtype)
        metrics["cov/selected_frac"] = selected.detach()
        return loss + self.cfg.beta * selected * log_ratio.abs(), metrics
