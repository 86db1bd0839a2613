"""Preference optimisation on offline pairs (ALGORITHMS.md section 2): DPO, TDPO1, TDPO2,
SparsePO and cDPO's token-weighted DPO, with SparsePO's masks and cDPO's critical weights.

The fact the trainer is built around: every loss here is a non-linear function
(-log sigmoid) of per-pair *sums over tokens* (Delta_w, Delta_l, SeqKL_w, SeqKL_l, masked
and weighted sums, L1 norms of masks). The sums are additive over tokens; the loss is not:
L(S_a + S_b) != L(S_a) + L(S_b). So:

1. `pair_sums` turns flat per-token tensors of *any subset* of a mini-batch's tokens,
   tagged with a global pair id and a side (chosen / rejected), into `PairSums` [P, 2];
   the sums of disjoint subsets add up to the sums of their union.
2. A learner must have the complete sums of a pair before it evaluates that pair's loss.
   Two exact ways, whatever the micro-batch size and the learner count:
   (a) pair-atomic micro-batches: both sequences of a pair in one micro-batch on one
       rank. Each micro-batch's loss is sum over its pairs of L_p / P, with P the pairs
       of the whole mini-batch (fixed before the split, like the RL token weights).
       Only the pairs present count: a pair with no tokens here has sums 0 and a loss
       of log 2, not 0.
   (b) pairs split across micro-batches or ranks: a first pass without gradient adds
       each micro-batch's `pair_sums` and all-reduces them (SUM) over ranks;
       `loss_coefficients` gives dL/dS at the complete sums; a second pass backpropagates
       `surrogate(partial sums, coefficients)` per micro-batch, whose gradients add up to
       the exact gradient. It costs a second forward.
   Averaging or summing per-micro-batch losses of incomplete sums is not exact.

Metrics are computed from complete sums too (`preference_metrics`), so they do not
depend on the split either.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Literal, Mapping, Sequence

import torch
from pydantic import Field, model_validator
from torch import nn

from rlpost.algorithms.base import AlgoConfig, Algorithm, Needs

CHOSEN, REJECTED = 0, 1  # columns of every PairSums field


@dataclass
class PairSums:
    """Per-pair sums over response tokens, float64 [P, 2] (column 0: y_w, column 1: y_l).

    u_t is the token's reward weight (SparsePO's m^u, cDPO's critical weight w_t; 1 when
    none is given) and d_t its divergence weight (SparsePO's m^d; 1 when none)."""

    delta: torch.Tensor  # sum_t u_t (log pi_theta(y_t) - log pi_ref(y_t))
    logp: torch.Tensor  # sum_t log pi_theta(y_t) (metrics)
    tokens: torch.Tensor  # number of tokens
    kl: torch.Tensor | None = None  # sum_t d_t KL(pi_ref || pi_theta)_t
    kl_raw: torch.Tensor | None = None  # sum_t KL_t (metrics)
    reward_l1: torch.Tensor | None = None  # sum_t |u_t|
    reward_zeros: torch.Tensor | None = None  # number of tokens with u_t = 0
    kl_l1: torch.Tensor | None = None  # sum_t |d_t|
    kl_zeros: torch.Tensor | None = None

    def items(self) -> list[tuple[str, torch.Tensor]]:
        """The fields present, by name."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "PairSums":
        """`fn` applied to every field present (e.g. an all-reduce over learner ranks)."""
        return PairSums(**{name: fn(value) for name, value in self.items()})

    def __add__(self, other: "PairSums") -> "PairSums":
        mine, theirs = dict(self.items()), dict(other.items())
        if mine.keys() != theirs.keys():
            raise ValueError(f"cannot add PairSums with fields {sorted(mine)} and {sorted(theirs)}")
        return PairSums(**{k: mine[k] + theirs[k] for k in mine})


def pair_sums(logp: torch.Tensor, ref_logp: torch.Tensor, pair_index: torch.Tensor,
              chosen: torch.Tensor, num_pairs: int, kl: torch.Tensor | None = None,
              reward_weight: torch.Tensor | None = None,
              kl_weight: torch.Tensor | None = None) -> PairSums:
    """Flat per-token tensors [T] -> PairSums over `num_pairs` pairs.

    `pair_index` [T] long: the token's pair, global over the mini-batch (so that partial
    sums from micro-batches and ranks add up); `chosen` [T] bool: its side. `kl`: the
    full-vocabulary KL(pi_ref || pi_theta) per token (`token_ops.chunked_token_kl`), for
    TDPO and SparsePO. `reward_weight` (u_t) / `kl_weight` (d_t): per-token multipliers of
    the log-ratio / the KL; cDPO gives its critical weights on rejected tokens and 1 on
    chosen ones. Gradients flow through logp, kl and both weights."""
    slot = pair_index * 2 + (~chosen.bool()).long()

    def total(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(num_pairs * 2, dtype=torch.float64, device=x.device)
        return out.index_add(0, slot, x.double()).view(num_pairs, 2)

    ratio = logp - ref_logp
    sums = PairSums(delta=total(ratio if reward_weight is None else reward_weight * ratio),
                    logp=total(logp.detach()), tokens=total(torch.ones_like(logp)))
    if kl is not None:
        sums.kl = total(kl if kl_weight is None else kl_weight * kl)
        sums.kl_raw = total(kl.detach())
    if reward_weight is not None:
        sums.reward_l1, sums.reward_zeros = total(reward_weight.abs()), total((reward_weight == 0).double())
    if kl_weight is not None:
        sums.kl_l1, sums.kl_zeros = total(kl_weight.abs()), total((kl_weight == 0).double())
    return sums


# ----- losses per pair [P] ---------------------------------------------------------------

_SOURCE = {"kl": "kl", "reward_l1": "reward_weight", "kl_l1": "kl_weight"}  # pair_sums' argument


def _needs(s: PairSums, field: str, loss: str) -> torch.Tensor:
    value = getattr(s, field)
    if value is None:
        raise ValueError(f"{loss} needs PairSums.{field}: pass {_SOURCE[field]} to pair_sums")
    return value


def dpo_loss(s: PairSums, beta: float = 0.1) -> torch.Tensor:
    """-log sigmoid(beta (Delta_w - Delta_l)). With critical weights in `s.delta` (on the
    rejected side) this is cDPO's token-weighted DPO, summed form."""
    return -nn.functional.logsigmoid(beta * (s.delta[:, CHOSEN] - s.delta[:, REJECTED]))


def tdpo_loss(s: PairSums, beta: float = 0.1, alpha: float = 0.5,
              variant: Literal[1, 2] = 1) -> torch.Tensor:
    """TDPO1: -log sigmoid(beta ((Delta_w - Delta_l) - (SeqKL_l - SeqKL_w)));
    TDPO2: -log sigmoid(beta ((Delta_w - Delta_l) - alpha (SeqKL_l - sg(SeqKL_w))))."""
    kl = _needs(s, "kl", f"tdpo{variant}")
    u = s.delta[:, CHOSEN] - s.delta[:, REJECTED]
    if variant == 1:
        return -nn.functional.logsigmoid(beta * (u - (kl[:, REJECTED] - kl[:, CHOSEN])))
    return -nn.functional.logsigmoid(beta * (u - alpha * (kl[:, REJECTED] - kl[:, CHOSEN].detach())))


def sparsepo_loss(s: PairSums, beta: float = 0.1, lambda_u: float = 0.0,
                  lambda_d: float = 0.0) -> torch.Tensor:
    """-log sigmoid(beta (u - d)) + lambda_u (|m^u_w|_1 + |m^u_l|_1) + lambda_d (|m^d_w|_1 + |m^d_l|_1),
    u = sum m^u_w Delta_w,t - sum m^u_l Delta_l,t (in `s.delta`), d = sum m^d_l KL_l,t -
    sum m^d_w KL_w,t (in `s.kl`). With all masks 1 the first term is TDPO1's loss."""
    kl = _needs(s, "kl", "sparsepo")
    reward_l1, kl_l1 = _needs(s, "reward_l1", "sparsepo"), _needs(s, "kl_l1", "sparsepo")
    u = s.delta[:, CHOSEN] - s.delta[:, REJECTED]
    d = kl[:, REJECTED] - kl[:, CHOSEN]
    return (-nn.functional.logsigmoid(beta * (u - d))
            + lambda_u * reward_l1.sum(-1) + lambda_d * kl_l1.sum(-1))


PreferenceLoss = Literal["dpo", "tdpo1", "tdpo2", "sparsepo", "cdpo"]


class PreferenceConfig(AlgoConfig):
    loss: PreferenceLoss = "dpo"
    beta: float = Field(0.1, gt=0)
    alpha: float = Field(0.5, ge=0, description="TDPO2's weight of the KL term")
    lambda_u: float = Field(0.0, ge=0, description="SparsePO: L1 weight of the reward masks")
    lambda_d: float = Field(0.0, ge=0, description="SparsePO: L1 weight of the divergence masks")
    masks: Literal["activation", "common", "independent"] = Field(
        "activation", description="SparsePO: masks from the reference model's activations, or "
        "learned with the policy, one network for m^u and m^d (common) or one each (independent)")
    mask_dropout: float = Field(0.0, ge=0, lt=1, description="SparsePO: dropout in the learned "
                                "mask networks")

    @model_validator(mode="after")
    def _consistent(self) -> "PreferenceConfig":
        # a setting of another loss would be silently ignored
        for key, losses in (("alpha", ("tdpo2",)), ("lambda_u", ("sparsepo",)), ("lambda_d", ("sparsepo",)),
                            ("masks", ("sparsepo",)), ("mask_dropout", ("sparsepo",))):
            if key in self.model_fields_set and self.loss not in losses:
                raise ValueError(f"algorithm.{key} is set but algorithm.loss is {self.loss!r}; "
                                 f"it applies to {', '.join(losses)}")
        if "mask_dropout" in self.model_fields_set and self.masks == "activation":
            raise ValueError("algorithm.mask_dropout is set but algorithm.masks is 'activation'; "
                             "it applies to the learned masks, common and independent")
        return self


def needs_token_kl(cfg: PreferenceConfig) -> bool:
    """Whether the learner must compute the full-vocabulary KL per token."""
    return cfg.loss in ("tdpo1", "tdpo2", "sparsepo")


def preference_loss(s: PairSums, cfg: PreferenceConfig) -> torch.Tensor:
    """The configured loss of each pair [P] (the mini-batch loss is their mean)."""
    if cfg.loss in ("dpo", "cdpo"):
        return dpo_loss(s, cfg.beta)
    if cfg.loss == "sparsepo":
        return sparsepo_loss(s, cfg.beta, cfg.lambda_u, cfg.lambda_d)
    return tdpo_loss(s, cfg.beta, cfg.alpha, 1 if cfg.loss == "tdpo1" else 2)


# ----- the learner's side -----------------------------------------------------------------
# Keys of `Sample.extra` (per-token tensors) that carry a pair's identity and cDPO's weights
# from the controller to the learner, where they reach `pair_sums`.
PAIR_INDEX = "pair_index"  # long: the token's pair, numbered over the whole mini-batch
CHOSEN_SIDE = "chosen_side"  # bool: True on y_w's tokens, False on y_l's
REWARD_WEIGHT = "reward_weight"  # float: cDPO's critical weight w_t on y_l, 1 on y_w


class Preference(Algorithm):
    """The preference losses as the learner runs them (`Learner.train_pairs`): the pair path
    reads `needs`, the mask and weight flags and `pair_loss`; RL's token-level parts do not apply.

    Every loss needs the reference model; TDPO and SparsePO need the full-vocabulary KL per
    token. SparsePO's masks: `activation_masks`, m^u = m^d from the reference model's
    activations (section 2 (a)), computed by the learner next to the reference log-probs;
    or `learned_masks` (section 2 (b)), the networks of `mask_networks`, which the learner
    trains as part of the policy's module, on the reference model's hidden states. cDPO's
    critical weights come with the data (`REWARD_WEIGHT`)."""

    name = "preference"
    Config = PreferenceConfig

    def __init__(self, cfg: PreferenceConfig):
        super().__init__(cfg)
        self.needs = Needs(reference=True, token_kl=needs_token_kl(cfg))
        sparsepo = cfg.loss == "sparsepo"
        self.activation_masks = sparsepo and cfg.masks == "activation"
        self.learned_masks = sparsepo and cfg.masks != "activation"
        self.critical_weights = cfg.loss == "cdpo"

    def mask_networks(self, num_layers: int, d_model: int, seed: int) -> SparsePOMasks:
        """SparsePO's learned mask networks, initialised from `seed` alone, so that every
        learner rank starts from the same ones."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return SparsePOMasks(num_layers, d_model, self.cfg.masks, self.cfg.mask_dropout)

    def advantages(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise TypeError("preference losses train on offline pairs (`rlpost dpo`); "
                        "they compute no advantages")

    def pair_loss(self, sums: PairSums) -> torch.Tensor:
        return preference_loss(sums, self.cfg)


# ----- exact gradients when a pair's tokens are split (way (b) of the module docstring) -----

def loss_coefficients(loss_fn: Callable[[PairSums], torch.Tensor], total: PairSums) -> PairSums:
    """dL/dS for every field of the complete sums `total` (gradient-free, e.g. all-reduced),
    where `loss_fn(sums)` is the scalar mini-batch loss. Fields the loss does not read, or
    reads only through a stop-gradient (TDPO2's SeqKL_w), get coefficient 0."""
    leaves = total.map(lambda x: x.detach().requires_grad_(True))
    named = leaves.items()
    grads = torch.autograd.grad(loss_fn(leaves), [v for _, v in named], allow_unused=True)
    return PairSums(**{name: torch.zeros_like(v) if g is None else g
                       for (name, v), g in zip(named, grads)})


def surrogate(partial: PairSums, coefficients: PairSums) -> torch.Tensor:
    """sum over pairs and fields of coefficient * partial sum: a micro-batch's backward of it
    gives that micro-batch's share of the exact gradient of the loss at the complete sums."""
    coef = dict(coefficients.items())
    return sum((coef[name] * value).sum() for name, value in partial.items())


# ----- metrics from complete sums --------------------------------------------------------

def preference_metrics(s: PairSums, cfg: PreferenceConfig) -> dict[str, float]:
    """Implicit rewards beta * Delta (the weighted sums the loss uses), their accuracy and
    margin, summed log-probs per sequence, mean per-token KL, mask mean and sparsity
    (fraction of tokens with mask 0) and cDPO's mean critical weight on rejected tokens."""
    s = s.map(lambda x: x.detach().double())
    r_w, r_l = cfg.beta * s.delta[:, CHOSEN], cfg.beta * s.delta[:, REJECTED]
    out = {"rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(),
           "rewards/accuracy": (r_w > r_l).double().mean(), "rewards/margin": (r_w - r_l).mean(),
           "logps/chosen": s.logp[:, CHOSEN].mean(), "logps/rejected": s.logp[:, REJECTED].mean()}
    tokens = s.tokens.sum()
    if s.kl_raw is not None:
        out["kl/per_token"] = s.kl_raw.sum() / tokens
        out["kl/chosen_per_token"] = s.kl_raw[:, CHOSEN].sum() / s.tokens[:, CHOSEN].sum()
        out["kl/rejected_per_token"] = s.kl_raw[:, REJECTED].sum() / s.tokens[:, REJECTED].sum()
    if cfg.loss == "cdpo" and s.reward_l1 is not None:
        out["critical_weight/mean"] = s.reward_l1[:, REJECTED].sum() / s.tokens[:, REJECTED].sum()
    if cfg.loss == "sparsepo":
        for name, l1, zeros in (("mask_u", s.reward_l1, s.reward_zeros), ("mask_d", s.kl_l1, s.kl_zeros)):
            if l1 is not None:
                out[f"{name}/mean"], out[f"{name}/sparsity"] = l1.sum() / tokens, zeros.sum() / tokens
    return {k: float(v) for k, v in out.items()}


# ----- cDPO: contrastive estimation of critical tokens ----------------------------------

def critical_weights(pos_logits: torch.Tensor, neg_logits: torch.Tensor, targets: torch.Tensor,
                     gamma: float = 1.0) -> torch.Tensor:
    """w_t = 1 - softmax((1 + gamma) z^pos_t - gamma z^neg_t)[y_t], from [N, V] logits of the
    positive and negative models at the tokens y_t [N] of an incorrect trajectory. For long
    sequences and large vocabularies use `chunked_critical_weights`."""
    z = (1.0 + gamma) * pos_logits.float() - gamma * neg_logits.float()
    log_s = z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return -torch.expm1(log_s)  # 1 - s without cancellation where s is close to 1


@torch.no_grad()
def chunked_critical_weights(pos_hidden: torch.Tensor, pos_head: nn.Module, neg_hidden: torch.Tensor,
                             neg_head: nn.Module, targets: torch.Tensor, gamma: float = 1.0,
                             chunk_size: int = 1024) -> torch.Tensor:
    """`critical_weights` from the final hidden states [N, H] of the two models and their
    output heads, at most `chunk_size` tokens of [tokens x vocab] logits at a time. The
    weights are constants of the later DPO loss: nothing here carries a gradient."""
    out = pos_hidden.new_empty(targets.shape[0], dtype=torch.float32)
    for s in range(0, targets.shape[0], chunk_size):
        out[s:s + chunk_size] = critical_weights(pos_head(pos_hidden[s:s + chunk_size]),
                                                 neg_head(neg_hidden[s:s + chunk_size]),
                                                 targets[s:s + chunk_size], gamma)
    return out


# ----- SparsePO masks --------------------------------------------------------------------

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
    """SparsePO's mask from the frozen reference model (ALGORITHMS.md section 2 (a)).

    `activations`: per kind (MLP activations, attention outputs, residual stream, logits)
    the hooked tensors of each layer, [..., T, D] (D may differ between kinds); `valid`
    [..., T] bool, the sequence's response tokens. Per tensor: the mean over its last
    dimension, z-normalised and min-max rescaled over the valid tokens; averaged over the
    layers of a kind, then over the kinds. Invalid tokens get 0. One mask serves u and d.

    The logits kind need not be materialised: mean_v z_v = h . mean_v W_v + mean_v b_v,
    which can be passed as a [..., T, 1] tensor."""
    valid = valid.bool()
    kinds = [torch.stack([_rescaled(x.float().mean(-1), valid) for x in layers]).mean(0)
             for layers in activations.values()]
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
            raise ValueError(f"mask network has {len(self.norms)} layers, "
                             f"got {len(hidden_states)} hidden states")
        dtype = self.mix.weight.dtype
        per_layer = torch.cat([self.dropout(nn.functional.relu(proj(norm(h.to(dtype)))))
                               for h, norm, proj in zip(hidden_states, self.norms, self.proj)], dim=-1)
        return nn.functional.relu(self.mix(per_layer)).squeeze(-1)


class SparsePOMasks(nn.Module):
    """m^u and m^d: one network shared by both ("common") or one each ("independent")."""

    def __init__(self, num_layers: int, d_model: int, kind: Literal["common", "independent"],
                 dropout: float = 0.0):
        super().__init__()
        self.reward = MaskNetwork(num_layers, d_model, dropout)
        self.divergence = MaskNetwork(num_layers, d_model, dropout) if kind == "independent" else None

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        m_u = self.reward(hidden_states)
        return m_u, (m_u if self.divergence is None else self.divergence(hidden_states))
