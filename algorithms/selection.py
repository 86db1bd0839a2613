"""Token and sample selection (docs/algorithms.md section 1, "Token and sample selection").

Everything here runs on the controller over the whole rollout batch, before it
is cut into mini-batches, so that quantiles and top-K thresholds do not depend
on the split. A sample selection removes rollouts from the batch; a token
selection is a boolean mask that the aggregation weights honour (a masked token
weighs 0 and leaves every normaliser, see `aggregation.aggregate`).

- D3S ("Learning More with Less: A Dynamic Dual-Level Down-Sampling
  Framework"): `max_variance_subset` keeps, per group, the N rollouts whose
  advantages have the largest variance; `top_fraction_mask` keeps the top-K
  fraction of tokens by |A| * H; `linear_schedule` moves N (as a fraction of
  the group, via `subset_size`) and K from an aggressive to a mild value.
- `entropy_quantile_mask`: keep tokens with H >= the (1 - rho) quantile.
- TW-GRPO ("Reinforcing Video Reasoning with Focused Thinking"): a weight per
  response position shared by a group, from how much the group's rollouts
  disagree there (`base.position_divergence`, `position_weights`). Weights scale the
  tokens' aggregation weights; they select nothing.

`valid` arguments are the tokens that may enter the loss at all (e.g. not those
of truncated responses); None means every token. Quantiles and fractions are
taken over the valid tokens only, and invalid tokens are never selected.
"""

from __future__ import annotations

import math

import torch

# the learner computes D_t, so it lives with the interface; re-exported for the old path


def quantile_linear(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a 1-D tensor with linear interpolation, as torch.quantile's
    default: sorted x at rank q (n - 1), interpolated between its neighbours. Written
    out because torch.quantile refuses inputs of more than 2^24 elements."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    v = x.sort().values
    rank = q * (v.numel() - 1)
    lo = int(rank // 1)
    hi = min(lo + 1, v.numel() - 1)
    return torch.lerp(v[lo], v[hi], torch.tensor(rank - lo, dtype=v.dtype))


def linear_schedule(start: float, end: float, steps: int, step: int) -> float:
    """`start` at RL step 1, moving linearly to `end` at step 1 + steps, `end` after."""
    return start + (end - start) * min(1.0, (step - 1) / steps)


def subset_size(frac: float, group_size: int) -> int:
    """N = frac * G rounded half up, within [1, G]."""
    return min(group_size, max(1, math.floor(frac * group_size + 0.5)))


def max_variance_subset(advantages: torch.Tensor, n: int) -> torch.Tensor:
    """Per row of advantages [P, G], the n entries whose (population) variance is the
    largest, as a boolean mask [P, G].

    The optimum is the j largest plus the n - j smallest entries for some j, so the
    row is sorted once and j = 0..n scanned with prefix sums; the first best j wins.
    Equal advantages are ordered by position (stable sort), so the choice among them
    is deterministic.
    """
    rows, g = advantages.shape
    if n >= g:
        return torch.ones(rows, g, dtype=torch.bool)
    a, order = torch.sort(advantages.double(), dim=1, stable=True)
    zero = torch.zeros(rows, 1, dtype=torch.float64)
    c1 = torch.cat([zero, a.cumsum(1)], dim=1)  # c1[:, k] = sum of the k smallest
    c2 = torch.cat([zero, a.square().cumsum(1)], dim=1)
    j = torch.arange(n + 1)

    def subset_sum(c: torch.Tensor) -> torch.Tensor:  # [P, n + 1]: bottom n - j plus top j
        return c[:, n - j] + c[:, g:] - c[:, g - j]

    mean = subset_sum(c1) / n
    var = subset_sum(c2) / n - mean.square()
    best = var.argmax(dim=1, keepdim=True)  # first maximum
    rank = torch.arange(g).expand(rows, g)
    keep_sorted = (rank < n - best) | (rank >= g - best)
    return torch.zeros(rows, g, dtype=torch.bool).scatter(1, order, keep_sorted)


def _valid_positions(n_tokens: int, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.arange(n_tokens)
    return valid.bool().nonzero().squeeze(1)


def top_fraction_mask(score: torch.Tensor, frac: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the k valid tokens with the largest score, k = frac * (valid tokens)
    rounded half up and at least 1 (when there is a valid token). Ties at the
    threshold go to the earlier tokens."""
    idx = _valid_positions(score.numel(), valid)
    k = min(idx.numel(), max(1, math.floor(frac * idx.numel() + 0.5)))
    top = torch.sort(score[idx], descending=True, stable=True).indices[:k]
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[idx[top]] = True
    return mask


def d3s_token_mask(
    advantages: torch.Tensor, entropy: torch.Tensor, frac: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """D3S token level: the top-`frac` valid tokens by |A_t| * H_t."""
    return top_fraction_mask(advantages.abs().double() * entropy.double(), frac, valid)


def entropy_quantile_mask(
    entropy: torch.Tensor, rho: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Tokens with H >= the (1 - rho) quantile of H over the valid tokens (linear
    interpolation, as `quantile_linear`): about the top rho fraction by entropy."""
    idx = _valid_positions(entropy.numel(), valid)
    mask = torch.zeros(entropy.numel(), dtype=torch.bool)
    if idx.numel():
        h = entropy.detach()[idx]
        mask[idx] = h >= quantile_linear(h, 1.0 - rho)
    return mask


def position_weights(divergence: torch.Tensor, alpha: float) -> torch.Tensor:
    """w_t = 1 + (alpha - 1) D_hat_t in [1, alpha], D_hat the min-max normalisation of D
    over the group's positions. Decision: when D is the same at every position (e.g. a
    single position) D_hat is 0 and every w_t is 1."""
    d = divergence.double()
    span = d.max() - d.min()
    d_hat = (d - d.min()) / span if span > 0 else torch.zeros_like(d)
    return 1.0 + (alpha - 1.0) * d_hat
