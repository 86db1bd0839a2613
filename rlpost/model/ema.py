"""An exponential moving average of the policy (ssToken's history model, `Needs.history_model`).

Each learner rank keeps its own copy: under ZeRO 0-2 every rank holds the same whole
parameters after each optimizer step, so the copies stay equal without a collective. The
average is kept in fp32 (a bf16 copy would round most of a 1 - decay step away) and the
copy that runs forwards holds it cast to the policy's dtype. Frozen parameters (the base
weights under LoRA) never move, so only the trainable ones are averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMAPolicy:
    def __init__(self, policy: nn.Module, decay: float):
        """Starts at `policy`'s current weights: theta_his <- decay theta_his + (1 - decay)
        theta at each `update`."""
        self.decay = decay
        self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        own = dict(self.model.named_parameters())
        self.names = [n for n, p in policy.named_parameters() if p.requires_grad]
        # an fp32 parameter is its own average; another dtype gets an fp32 one beside it
        self.cast = {n for n in self.names if own[n].dtype != torch.float32}
        self.average = {n: own[n].detach().float().clone() if n in self.cast else own[n] for n in self.names}

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        params, own = dict(policy.named_parameters()), dict(self.model.named_parameters())
        for n in self.names:
            self.average[n].lerp_(params[n].detach().float(), 1.0 - self.decay)
            if n in self.cast:
                own[n].copy_(self.average[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: a.detach().cpu().clone() for n, a in self.average.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.names):
            raise ValueError(f"EMA state holds {sorted(set(state) ^ set(self.names))[:3]} unlike the policy")
        own = dict(self.model.named_parameters())
        for n in self.names:
            self.average[n].copy_(state[n])
            if n in self.cast:
                own[n].copy_(self.average[n])
