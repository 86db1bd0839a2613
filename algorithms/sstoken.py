"""ssToken, self-modulated and semantic-aware token selection for SFT (arXiv 2510.18250;
docs/algorithms.md section 8).

Per response token y_t of a sample:
- REL_t = L_his(y_t) - L_theta(y_t) = log pi_theta(y_t) - log pi_his(y_t), the loss under a
  history model (`history_model`: the frozen start model, or an EMA of the policy) minus the
  loss under the current one;
- REL'_t = (REL_t - min REL) / (max REL - min REL) over the sample's response tokens, 0 for
  every token of a sample whose REL are all equal;
- Attn_t = the last layer's attention from y_t's own position to the prompt's positions,
  summed over them and averaged over heads, of the current policy (in [0, 1], not normalised);
- score_t = gamma REL'_t + (1 - gamma) Attn_t;
- the top k_i = ceil(rho |y_i|) tokens of each sample by score train (ties: the earlier
  token first), with the NLL; the loss is their sum over the mini-batch divided by
  sum_i k_i (the token mean over the selected tokens, as the paper's code takes it).

The learner computes log pi_his and Attn in its forward (`Needs.history_model`,
`Needs.prompt_attention`) and hands them over in `TokenTensors.extra`; the selection is per
sample and a micro-batch holds whole samples, and the normaliser sum_i k_i is in the
weights, computed over the whole mini-batch: the result does not depend on the split.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from rlpost.algorithms.base import (
    HISTORY_LOGP,
    PROMPT_ATTENTION,
    AlgoConfig,
    Conditional,
    MiniBatchView,
    Needs,
    TokenLoss,
    TokenTensors,
)


class SSTokenConfig(AlgoConfig):
    gamma: float = Field(0.5, ge=0, le=1, description="weight of REL' in the score; 1 - gamma on Attn")
    rho: float = Field(0.6, gt=0, le=1, description="each sample trains its top ceil(rho |y|) tokens")
    history_model: Literal["reference", "ema"] = Field(
        "reference", description="the frozen start model, or an EMA of the policy (ema_decay)"
    )
    ema_decay: float = Field(
        0.99, ge=0, lt=1, description="theta_his <- ema_decay theta_his + (1 - ema_decay) theta per step"
    )

    conditionals = (Conditional("ema_decay", "history_model", ("ema",), "set algorithm.history_model: ema"),)


def selected_counts(lengths: torch.Tensor, rho: float) -> torch.Tensor:
    """k_i = ceil(rho |y_i|) per sample (long); rho |y| within 1e-9 of an integer counts as that
    integer, so that 0.14 x 50 (7.000000000000001 in floating point) selects 7 tokens."""
    return torch.ceil(rho * lengths.double() - 1e-9).long()


def normalised_rel(rel: torch.Tensor, seq_index: torch.Tensor) -> torch.Tensor:
    """REL' per token: min-max over each sequence's tokens; 0 where a sequence's REL are equal."""
    count = int(seq_index.max()) + 1 if len(seq_index) else 0
    lo = rel.new_full((count,), math.inf).scatter_reduce(0, seq_index, rel, "amin")
    hi = rel.new_full((count,), -math.inf).scatter_reduce(0, seq_index, rel, "amax")
    span = (hi - lo)[seq_index]
    return torch.where(span > 0, (rel - lo[seq_index]) / torch.where(span > 0, span, 1.0), 0.0)


def top_per_sequence(score: torch.Tensor, seq_index: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[T] bool: each sequence's k[s] highest-scoring tokens; among equal scores the earlier
    token ranks first. Tokens of a sequence are contiguous, in order."""
    by_score = torch.sort(score, descending=True, stable=True).indices
    order = by_score[torch.sort(seq_index[by_score], stable=True).indices]  # sequences in order
    sizes = torch.bincount(seq_index, minlength=len(k))
    rank = torch.arange(len(score), device=score.device) - (sizes.cumsum(0) - sizes)[seq_index[order]]
    selected = torch.zeros(len(score), dtype=torch.bool, device=score.device)
    selected[order] = rank < k[seq_index[order]]
    return selected


class SSToken(TokenLoss):
    name = "sstoken"
    Config = SSTokenConfig

    def __init__(self, cfg: SSTokenConfig):
        super().__init__(cfg)
        # a signal whose weight is 0 is not computed
        history = cfg.history_model if cfg.gamma > 0 else None
        self.needs = Needs(
            reference=history == "reference",
            history_model=history,
            ema_decay=cfg.ema_decay if history == "ema" else 0.0,
            prompt_attention=cfg.gamma < 1,
        )

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        """1 / sum_i ceil(rho |y_i|) on every token: the selected ones' loss is a mean over the
        mini-batch's selected tokens (the others' loss is 0)."""
        total = int(selected_counts(batch.lengths, self.cfg.rho).sum())
        return torch.full((len(batch.seq_index),), 1.0 / max(total, 1), dtype=torch.float64)

    def scores(self, t: TokenTensors) -> dict[str, torch.Tensor]:
        """REL, REL', Attn (those the config uses) and the score per token, float64."""
        gamma = self.cfg.gamma
        score = torch.zeros_like(t.logp, dtype=torch.float64)
        out = {}
        if gamma > 0:
            if HISTORY_LOGP not in t.extra:
                raise KeyError(f"sstoken needs log pi_his as TokenTensors.extra[{HISTORY_LOGP!r}]")
            out["rel"] = t.logp.detach().double() - t.extra[HISTORY_LOGP].double()
            out["rel_norm"] = normalised_rel(out["rel"], t.seq_index)
            score = score + gamma * out["rel_norm"]
        if gamma < 1:
            if PROMPT_ATTENTION not in t.extra:
                raise KeyError(
                    f"sstoken needs the prompt attention as TokenTensors.extra[{PROMPT_ATTENTION!r}]"
                )
            out["attn"] = t.extra[PROMPT_ATTENTION].double()
            score = score + (1 - gamma) * out["attn"]
        out["score"] = score
        return out

    def token_loss(self, t: TokenTensors):
        s = self.scores(t)
        sizes = torch.bincount(t.seq_index)
        selected = top_per_sequence(s["score"], t.seq_index, selected_counts(sizes, self.cfg.rho))
        nll = -t.logp
        metrics = {
            "nll": nll.detach(),
            # only the selected tokens: their mean over the mini-batch is the selected NLL
            "nll_selected": nll.detach()[selected],
            "sstoken/selected_frac": selected.double(),
        }
        if "rel" in s:
            metrics["sstoken/rel_mean"] = s["rel"]
        if "attn" in s:
            metrics["sstoken/attn_mean"] = s["attn"]
        return nll * selected, metrics
