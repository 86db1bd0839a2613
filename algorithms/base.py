"""The algorithm interface.

An algorithm is pure tensor code in three parts, each run where its inputs live:

- `advantages(rewards, lengths)`: on the controller, over the whole rollout
  batch ([prompts, group] rewards and response lengths -> [prompts, group]
  sequence advantages). Then, optionally and also over the whole rollout batch,
  `select_samples` (which rollouts train) and, once the old policy's entropies
  are known, `token_inputs`, `token_mask` (which tokens enter the loss),
  `position_weights` (TW-GRPO) and `sampling_rule` (a per-token temperature
  for the next rollout batch, HAPO).
- `token_weights(batch)`: on the controller, over one whole optimizer-step
  mini-batch, *before* it is split into micro-batches and learner ranks. The
  loss of the mini-batch is sum_tokens weight * token_loss, so every
  normaliser (token counts, sequence counts, group sizes) lives in the weights
  and the result cannot depend on how the mini-batch is cut.
- `token_loss(t)`: on the learners, per micro-batch, on flat token tensors.

The runtime never knows which algorithm runs; it reads `needs` to decide what
to compute (reference log-probs, entropy with gradient).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from rlpost.algorithms.hapo import TemperatureRule


class AlgoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Key of `Sample.extra` that carries the loss mask (bool per token) from `token_mask`
# to `MiniBatchView.token_mask`. It also reaches `TokenTensors.extra`, where it is not
# needed: the weights already hold it.
TOKEN_MASK = "token_mask"
# Key of `Sample.extra` that carries per-token multipliers of the aggregation weights
# (TW-GRPO's position weights) to `MiniBatchView.token_scale`.
TOKEN_SCALE = "token_scale"


@dataclass(frozen=True)
class Needs:
    reference: bool = False  # log-probs of a frozen reference policy
    entropy_grad: bool = False  # entropy enters the loss (not only metrics)
    position_divergence: bool = False  # per group and response position (TW-GRPO)
    # the full-vocabulary KL(pi_ref || pi_theta) per token, with its gradient (TDPO, SparsePO,
    # ASFT); the learner computes it in its forward pass (token_ops.chunked_token_kl)
    token_kl: bool = False
    # `token_inputs` or `token_mask` read the old policy's entropies: the controller must
    # see the log-prob pass before the update. Without it, an RL step scores and trains in
    # one learner call (`Learner.score_and_train`), and `token_mask` gets entropy=None.
    old_policy_entropy: bool = False


@dataclass
class MiniBatchView:
    """Flat per-token view of a mini-batch, as the controller holds it.

    Token tensors are 1-D over all response tokens of all sequences,
    concatenated in sequence order; `seq_index` maps tokens to sequences.
    """

    seq_index: torch.Tensor  # [T] long
    lengths: torch.Tensor  # [S] response lengths
    advantages: torch.Tensor  # [T]
    group_index: torch.Tensor  # [S] long, group id of each sequence
    num_sequences: int
    # [T] bool, the tokens that enter the loss; None: all. Aggregations drop the
    # others from every normaliser (see aggregation.aggregate).
    token_mask: torch.Tensor | None = None
    # [T] multipliers of the tokens' aggregation weights; None: all 1
    token_scale: torch.Tensor | None = None


@dataclass
class TokenTensors:
    """What a learner hands to `token_loss` for one micro-batch (flat over tokens)."""

    logp: torch.Tensor  # [T] log pi_theta(y_t), with grad
    old_logp: torch.Tensor  # [T] at rollout-batch time
    advantages: torch.Tensor  # [T]
    # [T] (with grad iff needs.entropy_grad); None under needs.token_kl, whose pass computes
    # the KL instead
    entropy: torch.Tensor | None
    ref_logp: torch.Tensor | None  # [T] if needs.reference
    seq_index: torch.Tensor  # [T] local sequence index within the micro-batch
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # from `token_inputs`


class Algorithm:
    name: ClassVar[str]
    Config: ClassVar[type[AlgoConfig]] = AlgoConfig
    needs: ClassVar[Needs] = Needs()

    def __init__(self, cfg: AlgoConfig):
        self.cfg = cfg

    def advantages(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select_samples(self, advantages: torch.Tensor, step: int) -> torch.Tensor | None:
        """Which rollouts of each group train, as a bool mask shaped like the sequence
        advantages [prompts, group]; None: all. `step` is the RL step (1-based)."""
        return None

    def token_mask(self, entropy: torch.Tensor, advantages: torch.Tensor,
                   valid: torch.Tensor | None, step: int) -> torch.Tensor | None:
        """The tokens that enter the loss, over the whole rollout batch (flat, in
        sequence order): the runtime's `valid` tokens (None: all), narrowed by the
        algorithm's token selection. None: all tokens."""
        return valid

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        raise NotImplementedError

    def token_inputs(self, entropy: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token inputs of `token_loss`, computed on the controller over the
        whole rollout batch from the old policy's entropies [T] (flat, in sequence
        order), so that batch statistics do not depend on the split."""
        return {}

    def position_weights(self, divergence: torch.Tensor) -> torch.Tensor:
        """Weights [L] of a group's response positions from their divergence D_t [L]
        (`Learner.position_divergence`), when `needs.position_divergence`."""
        raise NotImplementedError

    def sampling_rule(self, entropy: torch.Tensor) -> "TemperatureRule | None":
        """A per-token temperature rule for the *next* rollout batch, from this batch's
        old-policy entropies at the base temperature; None: plain temperature."""
        return None

    def weight_metrics(self, batch: MiniBatchView, weights: torch.Tensor) -> dict[str, float]:
        """Per-mini-batch diagnostics of the aggregation weights (logged as step means)."""
        return {}

    def token_loss(self, t: TokenTensors) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token loss [T] and per-token metric tensors.

        Metric names ending in '_max' / '_min' are reduced by max / min over the
        mini-batch; all others are averaged over its tokens.
        """
        raise NotImplementedError
