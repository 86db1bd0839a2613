"""Dynamic loss-based sample reweighting (arXiv 2502.06733; docs/algorithms.md section 8).

From the per-sample losses l_i of one optimizer step (every sample of it, on every rank):
h_i = 2 (l_i - min) / (max - min) - 1 in [-1, 1]; f = min(h + 1, 1) (linupper), 1 - h^2
(mid) or |h| (extremes); w = softmax(f / tau). The learners multiply each sample's share
of the step's loss by N w_i (mean 1), without a gradient through w. torch's softmax
subtracts the largest f / tau before the exponentials, so no tau overflows them or leaves
an all-zero sum. When max == min (or N = 1) every multiplier is exactly 1.
"""

from __future__ import annotations

import torch

SCHEMES = {
    "linupper": lambda h: torch.clamp(h + 1, max=1.0),
    "mid": lambda h: 1 - h * h,
    "extremes": lambda h: h.abs(),
}


def sample_multipliers(losses: torch.Tensor, scheme: str, temperature: float) -> torch.Tensor:
    """N w_i of each of the N `losses` (1-D, every sample of the step), in float64."""
    losses = losses.detach().double()
    if len(losses) == 0 or losses.min() == losses.max():
        return torch.ones_like(losses)  # equal losses: the step is the unweighted one, bit for bit
    lo, hi = losses.min(), losses.max()
    h = 2 * (losses - lo) / (hi - lo) - 1
    return len(losses) * torch.softmax(SCHEMES[scheme](h) / temperature, dim=0)


def reweight_metrics(losses: torch.Tensor, multipliers: torch.Tensor) -> dict[str, float]:
    """The step's spread of losses (max - min) and its effective sample size over N,
    1 / (N sum_i w_i^2) = N / sum_i (N w_i)^2: 1 for uniform weights, 1/N for one sample."""
    return {
        "reweight/loss_spread": float(losses.max() - losses.min()),
        "reweight/ess_frac": float(len(multipliers) / (multipliers * multipliers).sum()),
    }
