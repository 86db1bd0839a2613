"""DAPO's rollout-side pieces as pure functions (docs/algorithms.md section 1, "DAPO pieces").

The trainer applies them to every algorithm when the `rollout` config asks
(`dynamic_sampling`, `overlong_buffer`, `mask_truncated`):

- `informative_groups`: dynamic sampling keeps only groups whose rewards are
  not all equal; the others have zero advantage under every estimator and so
  give no policy gradient. The trainer refills the batch with further rounds
  of prompts, at most `rollout.max_extra_rounds`.
- `overlong_penalty`: soft punishment of long responses, added to the task
  reward (so it also counts when deciding whether a group is informative).
- Masking truncated responses happens through the loss mask (their tokens get
  weight 0 and leave the normalisers), see `Algorithm.token_mask`.
"""

from __future__ import annotations

import torch


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] rewards -> [P] bool: the groups whose rewards are not all equal."""
    return rewards.amax(dim=1) != rewards.amin(dim=1)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO overlong reward shaping with L_max = max_length and cache L_c = buffer:
    0 if |y| <= L_max - L_c; ((L_max - L_c) - |y|) / L_c if L_max - L_c < |y| <= L_max;
    -1 beyond (float64)."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong shaping needs 0 < buffer <= max_length; got {buffer}, {max_length}")
    y = lengths.double()
    soft = float(max_length - buffer)
    ramp = (soft - y) / buffer
    return torch.where(
        y <= soft, torch.zeros_like(y), torch.where(y <= max_length, ramp, -torch.ones_like(y))
    )
