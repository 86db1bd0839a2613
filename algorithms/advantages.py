"""Sequence advantages from group rewards (docs/algorithms.md section 1, "Advantages").

Every function maps rewards [P, G] (P prompts, G responses per prompt) to
advantages [P, G]; every token of response i then carries A_i. `ADVANTAGES`
maps a name to a callable with one signature, `(rewards, lengths, eps)`, where
`lengths` [P, G] are response token counts (only "hapo" reads them) and `eps`
is the GRPO std epsilon (read by "grpo" and by the GRPO fallback of "hapo").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

HAPO_SIGMA_EPS = 1e-6  # the fixed epsilon in A = (r - mu) / (sigma + 1e-6)


def grpo(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_g r) / (std_g r + eps) per row, std with Bessel's correction (as
    TRL and verl). A group of one has advantage 0."""
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def dr_grpo(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: r - mean_g r (no std division)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean_g r). A group of one has
    no other response to compare with: advantage 0."""
    g = rewards.shape[1]
    if g < 2:
        return torch.zeros_like(rewards)
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)
    return rewards - others_mean


def hapo_token_level(
    rewards: torch.Tensor, lengths: torch.Tensor, eps_fallback_threshold: float = 5.0, eps: float = 1e-6
) -> torch.Tensor:
    """HAPO token-level group average: token-length-weighted group statistics
    mu = sum |o_i| r_i / sum |o_i|, sigma^2 = sum |o_i| (r_i - mu)^2 / sum |o_i|,
    A_i = (r_i - mu) / (sigma + 1e-6). A group in which some |A_i| >= the threshold
    (5) takes its GRPO advantages instead (`grpo(rewards, eps)` for that row).

    Groups whose rewards are all equal (zero variance) get exactly 0, as do groups
    with no response tokens at all (sum |o_i| = 0: nothing would carry the advantage).
    """
    r = rewards
    w = lengths.to(r.dtype)
    total = w.sum(dim=1, keepdim=True)
    safe_total = total.clamp(min=1)
    mu = (w * r).sum(dim=1, keepdim=True) / safe_total
    var = (w * (r - mu).square()).sum(dim=1, keepdim=True) / safe_total
    a = (r - mu) / (var.sqrt() + HAPO_SIGMA_EPS)
    fallback = (a.abs() >= eps_fallback_threshold).any(dim=1, keepdim=True)
    a = torch.where(fallback, grpo(r, eps), a)
    no_signal = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)) | (total <= 0)
    return torch.where(no_signal, torch.zeros_like(a), a)


AdvantageName = Literal["grpo", "dr_grpo", "rloo", "hapo"]

ADVANTAGES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "grpo": lambda rewards, lengths, eps: grpo(rewards, eps),
    "dr_grpo": lambda rewards, lengths, eps: dr_grpo(rewards),
    "rloo": lambda rewards, lengths, eps: rloo(rewards),
    "hapo": lambda rewards, lengths, eps: hapo_token_level(rewards, lengths, eps=eps),
}
