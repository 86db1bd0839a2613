"""Per-pair sums over tokens, the additive currency of every pair loss, and exact gradients from them.

The fact the pair learner is built around: every pair loss (algorithms/preference.py) is a
non-linear function (-log sigmoid) of per-pair *sums over tokens* (Delta_w, Delta_l,
SeqKL_w, SeqKL_l, masked and weighted sums, L1 norms of masks). The sums are additive over
tokens; the loss is not: L(S_a + S_b) != L(S_a) + L(S_b). So:

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

CHOSEN, REJECTED = 0, 1  # columns of every PairSums field


@dataclass
class PairSums:
    """Per-pair sums over response tokens, float64 [P, 2] (column 0: y_w, column 1: y_l).

    u_t is the token's reward weight (SparsePO's m^u, cDPO's critical weight w_t; 1 when
    none is given), d_t its divergence weight (SparsePO's m^d; 1 when none) and r_t its
    token reward (T-REG's, a constant of the data)."""

    delta: torch.Tensor  # sum_t u_t (log pi_theta(y_t) - log pi_ref(y_t))
    logp: torch.Tensor  # sum_t log pi_theta(y_t) (metrics)
    tokens: torch.Tensor  # number of tokens
    kl: torch.Tensor | None = None  # sum_t d_t KL(pi_ref || pi_theta)_t
    kl_raw: torch.Tensor | None = None  # sum_t KL_t (metrics)
    reward_l1: torch.Tensor | None = None  # sum_t |u_t|
    reward_zeros: torch.Tensor | None = None  # number of tokens with u_t = 0
    kl_l1: torch.Tensor | None = None  # sum_t |d_t|
    kl_zeros: torch.Tensor | None = None
    reg: torch.Tensor | None = None  # sum_t r_t log pi_theta(y_t), with its gradient
    token_reward: torch.Tensor | None = None  # sum_t r_t (metrics)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        """The fields present, by name."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PairSums:
        """`fn` applied to every field present (e.g. an all-reduce over learner ranks)."""
        return PairSums(**{name: fn(value) for name, value in self.items()})

    def required(self, name: str, loss: str) -> torch.Tensor:
        """The field `name`, which `loss` reads; a ValueError naming pair_sums' argument
        that gives it when it is absent."""
        value = getattr(self, name)
        if value is None:
            arguments = {
                "kl": "kl",
                "reward_l1": "reward_weight",
                "kl_l1": "kl_weight",
                "reg": "token_reward",
            }
            source = arguments[name]
            raise ValueError(f"{loss} needs PairSums.{name}: pass {source} to pair_sums")
        return value

    def __add__(self, other: PairSums) -> PairSums:
        mine, theirs = dict(self.items()), dict(other.items())
        if mine.keys() != theirs.keys():
            raise ValueError(f"cannot add PairSums with fields {sorted(mine)} and {sorted(theirs)}")
        return PairSums(**{k: mine[k] + theirs[k] for k in mine})


def pair_sums(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    pair_index: torch.Tensor,
    chosen: torch.Tensor,
    num_pairs: int,
    kl: torch.Tensor | None = None,
    reward_weight: torch.Tensor | None = None,
    kl_weight: torch.Tensor | None = None,
    token_reward: torch.Tensor | None = None,
) -> PairSums:
    """Flat per-token tensors [T] -> PairSums over `num_pairs` pairs.

    `pair_index` [T] long: the token's pair, global over the mini-batch (so that partial
    sums from micro-batches and ranks add up); `chosen` [T] bool: its side. `kl`: the
    full-vocabulary KL(pi_ref || pi_theta) per token (`token_ops.chunked_token_kl`), for
    TDPO and SparsePO. `reward_weight` (u_t) / `kl_weight` (d_t): per-token multipliers of
    the log-ratio / the KL; cDPO gives its critical weights on rejected tokens and 1 on
    chosen ones. `token_reward` (r_t): T-REG's constant per-token rewards, on both sides.
    Gradients flow through logp, kl and both weights."""
    slot = pair_index * 2 + (~chosen.bool()).long()

    def total(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(num_pairs * 2, dtype=torch.float64, device=x.device)
        return out.index_add(0, slot, x.double()).view(num_pairs, 2)

    ratio = logp - ref_logp
    sums = PairSums(
        delta=total(ratio if reward_weight is None else reward_weight * ratio),
        logp=total(logp.detach()),
        tokens=total(torch.ones_like(logp)),
    )
    if kl is not None:
        sums.kl = total(kl if kl_weight is None else kl_weight * kl)
        sums.kl_raw = total(kl.detach())
    if reward_weight is not None:
        sums.reward_l1, sums.reward_zeros = total(reward_weight.abs()), total((reward_weight == 0).double())
    if kl_weight is not None:
        sums.kl_l1, sums.kl_zeros = total(kl_weight.abs()), total((kl_weight == 0).double())
    if token_reward is not None:
        r = token_reward.detach()
        sums.reg, sums.token_reward = total(r * logp), total(r)
    return sums


def loss_coefficients(loss_fn: Callable[[PairSums], torch.Tensor], total: PairSums) -> PairSums:
    """dL/dS for every field of the complete sums `total` (gradient-free, e.g. all-reduced),
    where `loss_fn(sums)` is the scalar mini-batch loss. Fields the loss does not read, or
    reads only through a stop-gradient (TDPO2's SeqKL_w), get coefficient 0."""
    leaves = total.map(lambda x: x.detach().requires_grad_(True))
    named = leaves.items()
    grads = torch.autograd.grad(loss_fn(leaves), [v for _, v in named], allow_unused=True)
    return PairSums(**{name: torch.zeros_like(v) if g is None else g for (name, v), g in zip(named, grads)})


def surrogate(partial: PairSums, coefficients: PairSums) -> torch.Tensor:
    """sum over pairs and fields of coefficient * partial sum: a micro-batch's backward of it
    gives that micro-batch's share of the exact gradient of the loss at the complete sums."""
    coef = dict(coefficients.items())
    return sum((coef[name] * value).sum() for name, value in partial.items())
