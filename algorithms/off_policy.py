"""Off-policy corrections: per-token loss weights from pi_prox / pi_b (docs/algorithms.md section 7).

pi_b is the behaviour policy (the rollout engine's log-probs of the sampled tokens), pi_prox
the learner's recomputation at the start of the update (`TokenTensors.old_logp`). Each
token's loss is multiplied by w_t = sg(correction of pi_prox / pi_b):
none 1; decoupled the ratio; tis min(ratio, tis_cap); icepop the ratio inside
[icepop_low, icepop_high], else 0; seq_mask min(rho_i, seq_cap) on every token of
sequence i, 0 when rho_i is outside [seq_low, seq_high], rho_i = prod_t ratio (or
exp(mean_t log ratio) with seq_geometric).

A weight of 0 removes a token's gradient and leaves it in the aggregation's normalisers
(IcePop's choice). Exact under any split: w_t depends only on its own sequence, and a
micro-batch holds whole sequences (`data.batch.plan`), so `seq_index` local to a
micro-batch is enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CORRECTIONS = ("none", "decoupled", "tis", "icepop", "seq_mask")


@dataclass(frozen=True)
class Correction:
    """The settings of `behaviour_weights`; the same keys as the config section
    `off_policy` (rlpost.config.rl.OffPolicyConfig), so `Correction(**section.model_dump())`
    builds it without this layer importing the config."""

    correction: str = "none"
    tis_cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    seq_cap: float = 2.0
    seq_low: float = 0.5
    seq_high: float = 2.0
    seq_geometric: bool = False

    def __post_init__(self):
        if self.correction not in CORRECTIONS:
            known = ", ".join(CORRECTIONS)
            raise ValueError(f"unknown off-policy correction {self.correction!r}; known: {known}")


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf  # a lower bound of 0 masks nothing


def behaviour_weights(
    prox_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    seq_index: torch.Tensor,
    cfg: Correction,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """w [T] (float64, no gradient) and per-token metric tensors, from pi_prox and pi_b's
    log-probs [T] and each token's sequence [T] (long, local to the micro-batch).
    `num_sequences`: seq_index's bound, when the caller knows it (saves reading a GPU tensor).

    Metrics (MetricSums' rules: _min / _max are extremes, the others token means):
    off_policy/weight_mean, _min, _max; truncated_frac (tis, seq_mask: a weight capped);
    masked_frac (icepop, seq_mask: a weight set to 0). none: ones and no metrics."""
    if cfg.correction == "none":
        return torch.ones(prox_logp.shape, dtype=torch.float64, device=prox_logp.device), {}
    # fp64: the ratios of a long sequence's product and the branch tests against the bounds
    log_ratio = prox_logp.detach().double() - behaviour_logp.detach().double()
    metrics: dict[str, torch.Tensor] = {}
    if cfg.correction == "seq_mask":
        if num_sequences is None:
            num_sequences = int(seq_index.max()) + 1 if seq_index.numel() else 0
        w = _sequence_weights(log_ratio, seq_index, num_sequences, cfg, metrics)
    else:
        ratio = log_ratio.exp()
        w = ratio
        if cfg.correction == "tis":
            capped = ratio > cfg.tis_cap
            w = ratio.clamp(max=cfg.tis_cap)
            metrics["off_policy/truncated_frac"] = capped.double()
        elif cfg.correction == "icepop":
            masked = (ratio < cfg.icepop_low) | (ratio > cfg.icepop_high)
            w = torch.where(masked, torch.zeros_like(ratio), ratio)
            metrics["off_policy/masked_frac"] = masked.double()
    metrics.update({"off_policy/weight_mean": w, "off_policy/weight_min": w, "off_policy/weight_max": w})
    return w, metrics


def _sequence_weights(
    log_ratio: torch.Tensor, seq_index: torch.Tensor, seqs: int, cfg: Correction, metrics: dict
) -> torch.Tensor:
    """seq_mask's weight of each token. Bounds are compared in log space: a product of a
    few hundred ratios overflows (or underflows) even fp64, its log does not."""
    log_rho = torch.zeros(seqs, dtype=log_ratio.dtype, device=log_ratio.device).index_add_(
        0, seq_index, log_ratio
    )
    if cfg.seq_geometric:
        log_rho = log_rho / torch.bincount(seq_index, minlength=seqs).clamp(min=1)
    log_rho = log_rho[seq_index]  # per token
    masked = (log_rho < _log(cfg.seq_low)) | (log_rho > _log(cfg.seq_high))
    capped = ~masked & (log_rho > _log(cfg.seq_cap))
    w = torch.where(masked, torch.zeros_like(log_rho), log_rho.clamp(max=_log(cfg.seq_cap)).exp())
    metrics["off_policy/truncated_frac"] = capped.double()
    metrics["off_policy/masked_frac"] = masked.double()
    return w
