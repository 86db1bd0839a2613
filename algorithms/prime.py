"""PRIME: token rewards from an implicit PRM trained online (arXiv 2502.01456; docs/algorithms.md s. 5).

The implicit PRM pi_phi is a causal LM (started from the policy's starting model, `prm:`
section) whose token reward is r_t = beta log(pi_phi(y_t) / pi_ref(y_t)), pi_ref its
frozen start, beta = 0.05. Advantages: the reward-to-go of (r_t minus the leave-one-out
mean over the group's other responses of their mean token reward), plus the RLOO advantage
of the outcome reward (decision: the paper's leave-one-out form; the released code's
per-token baseline differs from it except at t = 0).

pi_phi is trained online on each step's rollouts by `ImplicitPRMLoss`, the binary
cross-entropy of sigmoid(beta sum_t log(pi_phi / pi_ref)) against the verifier's outcome
label. Decision on the order: the step's token rewards come from the PRM before it trains
on that step's labels (the labels of a response never shape its own credit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from rlpost.algorithms.aggregation import aggregate
from rlpost.algorithms.base import (
    AlgoConfig,
    Credit,
    CreditInputs,
    MiniBatchView,
    Needs,
    TokenLoss,
    TokenTensors,
)
from rlpost.algorithms.credit_base import CreditAlgorithm, CreditConfig
from rlpost.algorithms.token_credit import prime_advantages

OUTCOME_LABEL = "outcome_label"  # Sample.extra: the verifier's 0/1, repeated over the tokens
IMPLICIT_PRM_LOSS = "rlpost.algorithms.prime:ImplicitPRMLoss"  # what the PRM learners run


class PRIMEConfig(CreditConfig):
    beta: float = Field(0.05, gt=0, description="r_t = beta log(pi_phi / pi_ref)")


class PRIME(CreditAlgorithm):
    name = "prime"
    Config = PRIMEConfig

    def __init__(self, cfg: PRIMEConfig):
        super().__init__(cfg)
        self.needs = Needs(implicit_prm=True, **self.regulariser_needs())

    def credit(self, inputs: CreditInputs) -> Credit:
        token_rewards = self.cfg.beta * (inputs.prm_logp.double() - inputs.prm_ref_logp.double())
        advantages = prime_advantages(token_rewards, inputs.lengths.flatten(), inputs.rewards)
        return Credit(advantages.float(), metrics={"prm/token_reward_mean": token_rewards.mean().item()})


def sequence_logits(
    beta: float, log_ratio: torch.Tensor, seq_index: torch.Tensor, sequences: int
) -> torch.Tensor:
    """beta sum_t log(pi_phi / pi_ref) of each sequence [S] from per-token log-ratios."""
    sums = torch.zeros(sequences, dtype=torch.float64, device=log_ratio.device)
    return beta * sums.index_add(0, seq_index, log_ratio.double())


class ImplicitPRMLossConfig(AlgoConfig):
    beta: float = Field(0.05, gt=0)


class ImplicitPRMLoss(TokenLoss):
    """The PRM's online loss: the mean over the mini-batch's responses of
    BCE(sigmoid(beta sum_t log(pi_phi / pi_ref)), label). Exact under any split: a micro-batch
    holds whole sequences, so each sequence's sum is taken within one, and seq-mean-token-mean
    weights 1 / (S |o_i|) over the whole mini-batch sum the per-token copies of a sequence's
    loss to loss_i / S."""

    name = "implicit_prm"
    Config = ImplicitPRMLossConfig
    needs = Needs(reference=True)

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        return aggregate("seq-mean-token-mean", batch)

    def token_loss(self, t: TokenTensors):
        sequences = int(t.seq_index.max()) + 1 if t.seq_index.numel() else 0
        logits = sequence_logits(self.cfg.beta, t.logp - t.ref_logp, t.seq_index, sequences)
        labels = torch.zeros(sequences, dtype=torch.float64, device=logits.device)
        labels[t.seq_index] = t.extra[OUTCOME_LABEL].double()
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        correct = ((logits > 0).double() == labels).double()
        return loss[t.seq_index], {"accuracy": correct[t.seq_index].detach()}
