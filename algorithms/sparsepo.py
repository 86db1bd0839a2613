"""SparsePO (docs/algorithms.md section 2): its loss of per-pair sums and its two kinds of token masks.

"SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks". Per-token
masks m^u (reward) and m^d (divergence) weight the pair sums (`pair_sums`'
`reward_weight` and `kl_weight`); `sparsepo_loss` adds their L1 norms. The masks are
(a) `activation_mask`, from the frozen reference model's activations, no parameters, one
mask for u and d; or (b) `SparsePOMasks`, learned networks on the reference's hidden
states, trained with the policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from rlpost.algorithms.pairs import CHOSEN, REJECTED, PairSums


def sparsepo_loss(
    s: PairSums, beta: float = 0.1, lambda_u: float = 0.0, lambda_d: float = 0.0
) -> torch.Tensor:
    """-log sigmoid(beta (u - d)) + lambda_u (|m^u_w|_1 + |m^u_l|_1) + lambda_d (|m^d_w|_1 + |m^d_l|_1),
    u = sum m^u_w Delta_w,t - sum m^u_l Delta_l,t (in `s.delta`), d = sum m^d_l KL_l,t -
    sum m^d_w KL_w,t (in `s.kl`). With all masks 1 the first term is TDPO1's loss."""
    kl = s.required("kl", "sparsepo")
    reward_l1, kl_l1 = s.required("reward_l1", "sparsepo"), s.required("kl_l1", "sparsepo")
    u = s.delta[:, CHOSEN] - s.delta[:, REJECTED]
    d = kl[:, REJECTED] - kl[:, CHOSEN]
    return -nn.functional.logsigmoid(beta * (u - d)) + lambda_u * reward_l1.sum(-1) + lambda_d * kl_l1.sum(-1)


def _rescaled(a: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """a [..., T] z-normalised over the valid tokens, then min-max rescaled to [0, 1] over
    them. (Min-max alone gives the same values, as it ignores any positive affine map; the
    z-score first keeps large activations, e.g. logits, from losing fp32 precision.) A
    sequence whose valid values are all equal has nothing to rank: its tokens get 1."""
    a = a.masked_fill(~valid, 0.0)  # padding may hold anything, inf and nan included
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = a.sum(-1, keepdim=True) / n
    std = ((a - mean).masked_fill(~valid, 0.0).square().sum(-1, keepdim=True) / n).sqrt()
    z = (a - mean) / std.clamp(min=torch.finfo(a.dtype).tiny)
    lo = z.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    hi = z.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    spread = hi - lo
    flat = ~(spread > 0)
    return torch.where(flat, torch.ones_like(z), (z - lo) / spread.masked_fill(flat, 1.0))


@torch.no_grad()
def activation_mask(activations: Mapping[str, Sequence[torch.Tensor]], valid: torch.Tensor) -> torch.Tensor:
    """SparsePO's mask from the frozen reference model (docs/algorithms.md section 2 (a)).

    `activations`: per kind (MLP activations, attention outputs, residual stream, logits)
    the hooked tensors of each layer, [..., T, D] (D may differ between kinds); `valid`
    [..., T] bool, the sequence's response tokens. Per tensor: the mean over its last
    dimension, z-normalised and min-max rescaled over the valid tokens; averaged over the
    layers of a kind, then over the kinds. Invalid tokens get 0. One mask serves u and d.

    The logits kind need not be materialised: mean_v z_v = h . mean_v W_v + mean_v b_v,
    which can be passed as a [..., T, 1] tensor."""
    valid = valid.bool()
    kinds = [
        torch.stack([_rescaled(x.float().mean(-1), valid) for x in layers]).mean(0)
        for layers in activations.values()
    ]
    return torch.where(valid, torch.stack(kinds).mean(0), 0.0)


class MaskNetwork(nn.Module):
    """One learned SparsePO mask (section 2 (b)): per layer LayerNorm -> Linear(d_model, 1) ->
    ReLU -> dropout on the reference model's hidden states, a bias-free linear mix over the
    layers, then ReLU. The mix starts as the plain average of the layers (our choice: the
    paper gives none), so the initial mask is not dead wherever one layer fires."""

    def __init__(self, num_layers: int, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))
        self.proj = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(num_layers))
        self.dropout = nn.Dropout(dropout)
        self.mix = nn.Linear(num_layers, 1, bias=False)
        nn.init.constant_(self.mix.weight, 1.0 / num_layers)

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """hidden_states: one [..., T, d_model] per layer -> mask [..., T] >= 0."""
        if len(hidden_states) != len(self.norms):
            raise ValueError(
                f"mask network has {len(self.norms)} layers, got {len(hidden_states)} hidden states"
            )
        dtype = self.mix.weight.dtype
        per_layer = torch.cat(
            [
                self.dropout(nn.functional.relu(proj(norm(h.to(dtype)))))
                for h, norm, proj in zip(hidden_states, self.norms, self.proj)
            ],
            dim=-1,
        )
        return nn.functional.relu(self.mix(per_layer)).squeeze(-1)


class SparsePOMasks(nn.Module):
    """m^u and m^d: one network shared by both ("common") or one each ("independent")."""

    def __init__(
        self, num_layers: int, d_model: int, kind: Literal["common", "independent"], dropout: float = 0.0
    ):
        super().__init__()
        self.reward = MaskNetwork(num_layers, d_model, dropout)
        self.divergence = MaskNetwork(num_layers, d_model, dropout) if kind == "independent" else None

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        m_u = self.reward(hidden_states)
        return m_u, (m_u if self.divergence is None else self.divergence(hidden_states))
