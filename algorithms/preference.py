"""Preference optimisation on offline pairs (docs/algorithms.md section 2): the pair-loss registry.

DPO, TDPO1, TDPO2, SparsePO, cDPO's token-weighted DPO and T-REG, each a function of per-pair
sums over tokens (`PairSums`; algorithms/pairs.py says why a loss is taken only of
complete sums). A new DPO variant is one function of `PairSums` and the config, and one
line of `PAIR_LOSSES`. SparsePO's loss and masks are in algorithms/sparsepo.py, T-REG's loss
and token rewards in algorithms/treg.py; cDPO's critical weights (contrastive estimation,
before training) are here.

Metrics are computed from complete sums too (`preference_metrics`), so they do not
depend on how pairs are cut into micro-batches either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from rlpost.algorithms.base import (
    AlgoConfig,
    Conditional,
    Needs,
    PairLoss,
)
from rlpost.algorithms.pairs import CHOSEN, REJECTED, PairSums
from rlpost.algorithms.sparsepo import SparsePOMasks, activation_mask, sparsepo_loss
from rlpost.algorithms.treg import (
    BETTER_PROMPT,
    PLACEHOLDER,
    WORSE_PROMPT,
    token_reward,
    treg_loss,
    treg_metrics,
)
from rlpost.errors import ConfigError


def dpo_loss(s: PairSums, beta: float = 0.1) -> torch.Tensor:
    """-log sigmoid(beta (Delta_w - Delta_l)). With critical weights in `s.delta` (on the
    rejected side) this is cDPO's token-weighted DPO, summed form."""
    return -nn.functional.logsigmoid(beta * (s.delta[:, CHOSEN] - s.delta[:, REJECTED]))


def tdpo_loss(s: PairSums, beta: float = 0.1, alpha: float = 0.5, variant: Literal[1, 2] = 1) -> torch.Tensor:
    """TDPO1: -log sigmoid(beta ((Delta_w - Delta_l) - (SeqKL_l - SeqKL_w)));
    TDPO2: -log sigmoid(beta ((Delta_w - Delta_l) - alpha (SeqKL_l - sg(SeqKL_w))))."""
    kl = s.required("kl", f"tdpo{variant}")
    u = s.delta[:, CHOSEN] - s.delta[:, REJECTED]
    if variant == 1:
        return -nn.functional.logsigmoid(beta * (u - (kl[:, REJECTED] - kl[:, CHOSEN])))
    return -nn.functional.logsigmoid(beta * (u - alpha * (kl[:, REJECTED] - kl[:, CHOSEN].detach())))


@dataclass(frozen=True)
class PairLossEntry:
    loss: Callable[[PairSums, PreferenceConfig], torch.Tensor]  # per pair [P]
    token_kl: bool = False  # reads PairSums.kl: the learner computes the KL per token


PAIR_LOSSES: dict[str, PairLossEntry] = {
    "dpo": PairLossEntry(lambda s, c: dpo_loss(s, c.beta)),
    "tdpo1": PairLossEntry(lambda s, c: tdpo_loss(s, c.beta, c.alpha, 1), token_kl=True),
    "tdpo2": PairLossEntry(lambda s, c: tdpo_loss(s, c.beta, c.alpha, 2), token_kl=True),
    "sparsepo": PairLossEntry(lambda s, c: sparsepo_loss(s, c.beta, c.lambda_u, c.lambda_d), token_kl=True),
    "cdpo": PairLossEntry(lambda s, c: dpo_loss(s, c.beta)),  # critical weights in s.delta
    "treg": PairLossEntry(lambda s, c: treg_loss(s, c.beta, c.treg_alpha)),  # r_t in s.reg
}

PreferenceLoss = Literal[tuple(PAIR_LOSSES)]


def _applies_to(*losses: str) -> tuple:
    return losses, f"it applies to {', '.join(losses)}"


class PreferenceConfig(AlgoConfig):
    loss: PreferenceLoss = "dpo"
    beta: float = Field(0.1, gt=0)
    alpha: float = Field(0.5, ge=0, description="TDPO2's weight of the KL term")
    lambda_u: float = Field(0.0, ge=0, description="SparsePO: L1 weight of the reward masks")
    lambda_d: float = Field(0.0, ge=0, description="SparsePO: L1 weight of the divergence masks")
    masks: Literal["activation", "common", "independent"] = Field(
        "activation",
        description="SparsePO: masks from the reference model's activations, or "
        "learned with the policy, one network for m^u and m^d (common) or one each (independent)",
    )
    mask_dropout: float = Field(0.0, ge=0, lt=1, description="SparsePO: dropout in the learned mask networks")
    # the paper searches alpha in {0.1, 0.25, 0.5} and names no default: the middle one
    treg_alpha: float = Field(0.25, ge=0, description="T-REG: weight of the token-reward regulariser")
    treg_better_prompt: str = Field(
        BETTER_PROMPT,
        description="T-REG: the revision prompt x_better, {prompt} standing for the pair's prompt",
    )
    treg_worse_prompt: str = Field(WORSE_PROMPT, description="T-REG: the revision prompt x_worse, likewise")

    conditionals = (
        *(
            Conditional(key, "loss", *_applies_to(*losses))
            for key, losses in (
                ("alpha", ("tdpo2",)),
                ("lambda_u", ("sparsepo",)),
                ("lambda_d", ("sparsepo",)),
                ("masks", ("sparsepo",)),
                ("mask_dropout", ("sparsepo",)),
                ("treg_alpha", ("treg",)),
                ("treg_better_prompt", ("treg",)),
                ("treg_worse_prompt", ("treg",)),
            )
        ),
        Conditional(
            "mask_dropout",
            "masks",
            ("common", "independent"),
            "it applies to the learned masks, common and independent",
        ),
    )

    @field_validator("treg_better_prompt", "treg_worse_prompt")
    @classmethod
    def _has_placeholder(cls, value: str, info: ValidationInfo) -> str:
        if PLACEHOLDER not in value:
            raise ConfigError(
                f"algorithm.{info.field_name} must contain {PLACEHOLDER}, where the pair's prompt goes"
            )
        return value


def needs_token_kl(cfg: PreferenceConfig) -> bool:
    """Whether the learner must compute the full-vocabulary KL per token."""
    return PAIR_LOSSES[cfg.loss].token_kl


def preference_loss(s: PairSums, cfg: PreferenceConfig) -> torch.Tensor:
    """The configured loss of each pair [P] (the mini-batch loss is their mean)."""
    return PAIR_LOSSES[cfg.loss].loss(s, cfg)


def preference_metrics(s: PairSums, cfg: PreferenceConfig) -> dict[str, float]:
    """Implicit rewards beta * Delta (the weighted sums the loss uses), their accuracy and
    margin, summed log-probs per sequence, mean per-token KL, mask mean and sparsity
    (fraction of tokens with mask 0), cDPO's mean critical weight on rejected tokens and
    T-REG's `treg_metrics`."""
    s = s.map(lambda x: x.detach().double())
    r_w, r_l = cfg.beta * s.delta[:, CHOSEN], cfg.beta * s.delta[:, REJECTED]
    out = {
        "rewards/chosen": r_w.mean(),
        "rewards/rejected": r_l.mean(),
        "rewards/accuracy": (r_w > r_l).double().mean(),
        "rewards/margin": (r_w - r_l).mean(),
        "logps/chosen": s.logp[:, CHOSEN].mean(),
        "logps/rejected": s.logp[:, REJECTED].mean(),
    }
    tokens = s.tokens.sum()
    if s.kl_raw is not None:
        out["kl/per_token"] = s.kl_raw.sum() / tokens
        out["kl/chosen_per_token"] = s.kl_raw[:, CHOSEN].sum() / s.tokens[:, CHOSEN].sum()
        out["kl/rejected_per_token"] = s.kl_raw[:, REJECTED].sum() / s.tokens[:, REJECTED].sum()
    if cfg.loss == "cdpo" and s.reward_l1 is not None:
        out["critical_weight/mean"] = s.reward_l1[:, REJECTED].sum() / s.tokens[:, REJECTED].sum()
    if cfg.loss == "treg" and s.reg is not None:
        out.update(treg_metrics(s, cfg.beta, cfg.treg_alpha))
    if cfg.loss == "sparsepo":
        for name, l1, zeros in (("mask_u", s.reward_l1, s.reward_zeros), ("mask_d", s.kl_l1, s.kl_zeros)):
            if l1 is not None:
                out[f"{name}/mean"], out[f"{name}/sparsity"] = l1.sum() / tokens, zeros.sum() / tokens
    return {k: float(v) for k, v in out.items()}


class Preference(PairLoss):
    """The preference losses (`algorithm.loss` picks one of `PAIR_LOSSES`).

    Every loss needs the reference model; TDPO and SparsePO need the full-vocabulary KL per
    token. SparsePO's masks: `activation_masks`, m^u = m^d from the reference model's
    activations (section 2 (a)), computed by the learner next to the reference log-probs;
    or `learned_masks` (section 2 (b)), the networks of `mask_networks`, which the learner
    trains as part of the policy's module, on the reference model's hidden states. cDPO's
    critical weights come with the data (`REWARD_WEIGHT`), and so do T-REG's token rewards
    (`TOKEN_REWARD`), which the runtime computes before training with `token_reward` from
    the reference's log-probs under the two `revision_prompts`."""

    name = "preference"
    Config = PreferenceConfig

    def __init__(self, cfg: PreferenceConfig):
        super().__init__(cfg)
        self.needs = Needs(reference=True, token_kl=needs_token_kl(cfg))
        sparsepo = cfg.loss == "sparsepo"
        self.activation_masks = sparsepo and cfg.masks == "activation"
        self.learned_masks = sparsepo and cfg.masks != "activation"
        self.critical_weights = cfg.loss == "cdpo"
        self.token_rewards = cfg.loss == "treg"

    def pair_loss(self, sums: PairSums) -> torch.Tensor:
        return preference_loss(sums, self.cfg)

    def metrics(self, sums: PairSums) -> dict[str, float]:
        return preference_metrics(sums, self.cfg)

    def revision_prompts(self) -> tuple[str, str]:
        """T-REG's (x_better, x_worse) templates, each with PLACEHOLDER for the pair's prompt."""
        return self.cfg.treg_better_prompt, self.cfg.treg_worse_prompt

    def token_reward(self, better_logp: torch.Tensor, worse_logp: torch.Tensor) -> torch.Tensor:
        return token_reward(better_logp, worse_logp)

    def activation_mask(self, activations, valid: torch.Tensor) -> torch.Tensor:
        return activation_mask(activations, valid)

    def mask_networks(self, num_layers: int, d_model: int, seed: int) -> SparsePOMasks:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return SparsePOMasks(num_layers, d_model, self.cfg.masks, self.cfg.mask_dropout)


# ----- cDPO: contrastive estimation of critical tokens ----------------------------------


def critical_weights(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, targets: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """w_t = 1 - softmax((1 + gamma) z^pos_t - gamma z^neg_t)[y_t], from [N, V] logits of the
    positive and negative models at the tokens y_t [N] of an incorrect trajectory. For long
    sequences and large vocabularies use `chunked_critical_weights`."""
    z = (1.0 + gamma) * pos_logits.float() - gamma * neg_logits.float()
    log_s = z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return -torch.expm1(log_s)  # 1 - s without cancellation where s is close to 1


@torch.no_grad()
def chunked_critical_weights(
    pos_hidden: torch.Tensor,
    pos_head: nn.Module,
    neg_hidden: torch.Tensor,
    neg_head: nn.Module,
    targets: torch.Tensor,
    gamma: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """`critical_weights` from the final hidden states [N, H] of the two models and their
    output heads, at most `chunk_size` tokens of [tokens x vocab] logits at a time. The
    weights are constants of the later DPO loss: nothing here carries a gradient."""
    out = pos_hidden.new_empty(targets.shape[0], dtype=torch.float32)
    for s in range(0, targets.shape[0], chunk_size):
        out[s : s + chunk_size] = critical_weights(
            pos_head(pos_hidden[s : s + chunk_size]),
            neg_head(neg_hidden[s : s + chunk_size]),
            targets[s : s + chunk_size],
            gamma,
        )
    return out
