"""The algorithm interface: three kinds (TokenLoss, PolicyGradient, PairLoss), Needs, SamplingRule.

Every algorithm is pure tensor code, in one of three kinds; the runtime reads `needs` to
decide what to compute (reference log-probs, entropy with gradient, ...) and never knows
which algorithm runs (DESIGN.md: outside rlpost/jobs it imports only the registry and this
module).

- `TokenLoss` (SFT): `token_weights(batch)` on the controller, over one whole
  optimizer-step mini-batch *before* it is split into micro-batches and learner ranks,
  (optionally with `minibatch_inputs(batch)`, per-token inputs of the loss chosen over
  the same whole mini-batch: KL-Cov's tokens) and `token_loss(t)` on the learners, per
  micro-batch, on flat token tensors. The loss
  of the mini-batch is sum_tokens weight * token_loss, so every normaliser (token
  counts, sequence counts, group sizes) lives in the weights and the result cannot
  depend on how the mini-batch is cut.
- `PolicyGradient(TokenLoss)` (GRPO, HAPO, GSPO): also `advantages(rewards, lengths)` on
  the controller over the whole rollout batch, then, optionally and also over the whole
  rollout batch, `select_samples` (which rollouts train) and, once the old policy's
  entropies are known, `token_inputs`, `token_mask` (which tokens enter the loss),
  `position_weights` (TW-GRPO) and `sampling_rule` (a per-token temperature for the
  next rollout batch, HAPO). State it keeps across steps on the controller (CEEH's
  per-question statistics) goes into the checkpoints through `state_dict`.
- `PairLoss` (DPO, TDPO, SparsePO, cDPO): a loss of per-pair sums over tokens
  (`algorithms.pairs`), taken where a pair's sums are complete.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, model_serializer, model_validator
from torch import nn

from rlpost.algorithms.pairs import PairSums, pair_sums
from rlpost.errors import ConfigError

# Keys of `Sample.extra` (per-token tensors) the runtime moves between the controller and
# the learners:
# the loss mask (bool) from `token_mask` to `MiniBatchView.token_mask`. It also reaches
# `TokenTensors.extra`, where it is not needed: the weights already hold it.
TOKEN_MASK = "token_mask"
# per-token multipliers of the aggregation weights (TW-GRPO's position weights), to
# `MiniBatchView.token_scale`
TOKEN_SCALE = "token_scale"
# the full-vocabulary KL(pi_ref || pi_theta) per token, with its gradient w.r.t. the
# policy, in `TokenTensors.extra` under `needs.token_kl` (the learner computes it)
TOKEN_KL = "token_kl"
# a pair's identity and cDPO's weights, from the controller to `PairLoss.pair_sums`
PAIR_INDEX = "pair_index"  # long: the token's pair, numbered over the whole mini-batch
CHOSEN_SIDE = "chosen_side"  # bool: True on y_w's tokens, False on y_l's
REWARD_WEIGHT = "reward_weight"  # float: cDPO's critical weight w_t on y_l, 1 on y_w
TOKEN_REWARD = "token_reward"  # float: T-REG's token reward r_t on both responses
# ssToken's signals, in `TokenTensors.extra` (the learner computes them in its forward):
# log pi_his(y_t) under `needs.history_model`, and the attention of `needs.prompt_attention`
HISTORY_LOGP = "history_logp"
PROMPT_ATTENTION = "prompt_attention"


@dataclass(frozen=True)
class Conditional:
    """`key` is a setting of `switch`'s `values` only. Under another value it would be
    silently ignored, so a config that sets it is refused (a ConfigError: its message names
    the keys), and a dump leaves it out: it holds its default there, and written out it
    would be refused when the dump is loaded again (resume)."""

    key: str
    switch: str
    values: tuple[Any, ...]
    hint: str


class AlgoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conditionals: ClassVar[tuple[Conditional, ...]] = ()

    def ignored_keys(self) -> set[str]:
        """The keys of options that are not selected."""
        return {c.key for c in self.conditionals if getattr(self, c.switch) not in c.values}

    @model_validator(mode="after")
    def _no_ignored_settings(self) -> AlgoConfig:
        for c in self.conditionals:
            value = getattr(self, c.switch)
            if c.key in self.model_fields_set and value not in c.values:
                raise ConfigError(f"algorithm.{c.key} is set but algorithm.{c.switch} is {value!r}; {c.hint}")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        ignored = self.ignored_keys()
        return {k: v for k, v in handler(self).items() if k not in ignored}


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
    # the inputs of `PolicyGradient.credit` beyond the rewards (docs/algorithms.md section 5),
    # each computed over the whole rollout batch before any advantage:
    # a critic's value V(s_t) of every response position (PPO's GAE); the runtime starts a
    # critic group (`critic:` section) and trains it on `Credit.returns` after each update
    values: bool = False
    # the old policy's probability of each sampled token and sum_v pi(v)^2 at its position
    # (the optimal token baseline), from the log-prob pass run before the advantages
    token_collision: bool = False
    # one reward per step of each response (`steps:` splits it; `step_reward` scores them)
    step_rewards: bool = False
    # K > 0: Monte-Carlo values at each step boundary, the mean reward of K continuations
    # the rollout engines sample from the prefix (VinePPO); `max_boundaries` caps the
    # boundaries per response (adjacent steps merged evenly)
    continuations: int = 0
    max_boundaries: int | None = None
    # an implicit PRM's log-probs and its reference's (PRIME); the runtime starts a PRM group
    # (`prm:` section) and trains it on the outcome labels after the advantages
    implicit_prm: bool = False
    # the old policy's entropy of every response token (`CreditInputs.entropy`), from the
    # log-prob pass run before the advantages (CEEH)
    credit_entropy: bool = False
    # each group's problem (`CreditInputs.prompts`) and each response's verifier outcome
    # (`CreditInputs.correct`): a credit that keeps per-question statistics across steps (CEEH)
    problem_outcomes: bool = False
    # log pi_his(y_t) of a history model in `TokenTensors.extra[HISTORY_LOGP]` (ssToken):
    # "reference", the frozen start model (set `reference` too), or "ema", a copy of the policy
    # each learner rank keeps, theta_his <- ema_decay theta_his + (1 - ema_decay) theta after
    # every optimizer step, saved with the learners' checkpoints; None: none
    history_model: str | None = None
    ema_decay: float = 0.0
    # the last layer's attention from each response token's own position to its prompt's
    # positions, summed over them and averaged over heads, of the policy's forward under no_grad,
    # in `TokenTensors.extra[PROMPT_ATTENTION]` (rlpost/model/prompt_attention.py)
    prompt_attention: bool = False

    @property
    def logprobs_before_credit(self) -> bool:
        """Whether the learners' log-prob pass runs before the advantages."""
        return self.token_collision or self.credit_entropy


@dataclass
class CreditInputs:
    """What `PolicyGradient.credit` reads: the outcome rewards and lengths [P, G] always, the
    rest when its `needs` ask (None otherwise). Per-token tensors are 1-D over all response
    tokens of the rollout batch in sequence order (group-major: response i is in group
    i // G); per-response lists hold one tensor per response in the same order."""

    rewards: torch.Tensor  # [P, G], float64
    lengths: torch.Tensor  # [P, G]
    step: int = 1  # the RL step (1-based)
    total_steps: int | None = None  # the run's RL steps (`steps`)
    values: torch.Tensor | None = None  # [T] V(s_t), the state before token t (needs.values)
    old_logp: torch.Tensor | None = None  # [T] (needs.token_collision)
    collision: torch.Tensor | None = None  # [T] sum_v pi_old(v)^2 (needs.token_collision)
    prm_logp: torch.Tensor | None = None  # [T] log pi_phi (needs.implicit_prm)
    prm_ref_logp: torch.Tensor | None = None  # [T] log pi_ref under the PRM's reference
    # per response: the exclusive token end of each step, increasing, the last = its length
    # (needs.step_rewards or needs.continuations)
    step_ends: list[torch.Tensor] | None = None
    step_rewards: list[torch.Tensor] | None = None  # per response: [K_i] (needs.step_rewards)
    # per response: V_hat(s_0..s_{K_i - 1}), the value of the state before each step
    # (needs.continuations)
    state_values: list[torch.Tensor] | None = None
    entropy: torch.Tensor | None = None  # [T] H of pi_old at each token (needs.credit_entropy)
    # a stable key of each group's problem (its prompt), [P] (needs.problem_outcomes)
    prompts: list[str] | None = None
    correct: torch.Tensor | None = None  # [P, G] bool, the verifier's (needs.problem_outcomes)


@dataclass
class Credit:
    """`PolicyGradient.credit`'s result: advantages [P, G] (one per response) or [T] (one per
    token); `returns` [T], the critic's regression targets under needs.values; per-step
    metrics of the credit."""

    advantages: torch.Tensor
    returns: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


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
    # [T] the old policy's log-probs (the log-prob pass), where every sample has them
    old_logp: torch.Tensor | None = None


@dataclass
class TokenTensors:
    """What a learner hands to `token_loss` for one micro-batch (flat over tokens).

    A micro-batch holds whole sequences (`data.batch.plan` never splits one), so a loss
    may reduce over each sequence's tokens through `seq_index` (GSPO does)."""

    logp: torch.Tensor  # [T] log pi_theta(y_t), with grad
    old_logp: torch.Tensor  # [T] at rollout-batch time
    advantages: torch.Tensor  # [T]
    # [T] (with grad iff needs.entropy_grad); None under needs.token_kl, whose pass computes
    # the KL instead
    entropy: torch.Tensor | None
    ref_logp: torch.Tensor | None  # [T] if needs.reference
    seq_index: torch.Tensor  # [T] local sequence index within the micro-batch
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # from `token_inputs`


@runtime_checkable
class SamplingRule(Protocol):
    """A per-token sampling rule, as rollout engines and learners use it: both derive the
    same per-token temperature from the entropy at the base temperature. Hashable (engines
    group rows by rule). `to_dict` names its class under "rule" ("pkg.module:Class"), so
    `rlpost.algorithms.sampling_rule_from_dict` rebuilds it in an engine or a checkpoint."""

    def factor(self, entropy: torch.Tensor) -> torch.Tensor:
        """T_t / T from the entropies at the base temperature T."""

    def apply(self, scaled_logits: torch.Tensor) -> torch.Tensor:
        """Logits already divided by T ([rows, vocab]) -> divided by T_t instead."""

    def to_dict(self) -> dict: ...

    @classmethod
    def from_dict(cls, d: dict) -> SamplingRule: ...


class Algorithm:
    """What the kinds share: a registry name, a typed Config and `needs`."""

    name: ClassVar[str]
    Config: ClassVar[type[AlgoConfig]] = AlgoConfig
    needs: Needs = Needs()  # instances may set their own from the config
    kind_name: ClassVar[str]  # "a pair loss": for the registry's errors
    runs: ClassVar[str]  # the job that runs the kind, "`rlpost dpo` runs pair losses"

    def __init__(self, cfg: AlgoConfig):
        self.cfg = cfg


class TokenLoss(Algorithm):
    kind_name = "a token loss"
    runs = "`rlpost sft` runs token losses"

    def token_weights(self, batch: MiniBatchView) -> torch.Tensor:
        raise NotImplementedError

    def weight_metrics(self, batch: MiniBatchView, weights: torch.Tensor) -> dict[str, float]:
        """Per-mini-batch diagnostics of the aggregation weights (logged as step means)."""
        return {}

    def minibatch_inputs(self, batch: MiniBatchView) -> dict[str, torch.Tensor]:
        """Extra per-token inputs of `token_loss` ([T], flat in the view's order), computed like
        the weights over one whole optimizer-step mini-batch before it is split, so that a
        selection by mini-batch statistics does not depend on the split (KL-Cov's); they
        reach `TokenTensors.extra` of that mini-batch only. {}: none."""
        return {}

    def token_loss(self, t: TokenTensors) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token loss [T] and per-token metric tensors.

        Metric names ending in '_max' / '_min' are reduced by max / min over the
        mini-batch; all others are averaged over its tokens.
        """
        raise NotImplementedError


class PolicyGradient(TokenLoss):
    kind_name = "a policy-gradient algorithm"
    runs = "`rlpost train` runs policy-gradient algorithms"

    def advantages(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """From rewards and response lengths [prompts, group]: per-sequence advantages
        [prompts, group] (every token of a response carries its A_i), or per-token advantages,
        1-D over all response tokens of the batch in sequence order (a critic's GAE, process
        rewards: docs/algorithms.md section 5). The runtime takes either
        (`rlpost.jobs.update.assign_advantages`) and hands the result to `select_samples`."""
        raise NotImplementedError

    def credit(self, inputs: CreditInputs) -> Credit:
        """The advantages of a rollout batch from what `needs` asked for (docs/algorithms.md
        section 5). Algorithms whose advantages read the rewards and lengths alone implement
        `advantages` instead. They get the rewards in float32, as they always have: the same
        config gives the same advantages, bit for bit, as before credit inputs existed."""
        return Credit(self.advantages(inputs.rewards.float(), inputs.lengths))

    def state_dict(self) -> dict:
        """The algorithm's own state on the controller (per-question statistics, ...), JSON-able:
        the trainer's checkpoints carry it and `load_state_dict` restores it, so that a resumed
        run repeats the uninterrupted one. {}: none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` gave ({} from a checkpoint written without one)."""

    def select_samples(self, advantages: torch.Tensor, step: int) -> torch.Tensor | None:
        """Which rollouts of each group train, as a bool mask shaped like the sequence
        advantages [prompts, group]; None: all. `step` is the RL step (1-based)."""
        return None

    def token_mask(
        self, entropy: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor | None, step: int
    ) -> torch.Tensor | None:
        """The tokens that enter the loss, over the whole rollout batch (flat, in
        sequence order): the runtime's `valid` tokens (None: all), narrowed by the
        algorithm's token selection. None: all tokens."""
        return valid

    def token_inputs(self, entropy: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token inputs of `token_loss`, computed on the controller over the
        whole rollout batch from the old policy's entropies [T] (flat, in sequence
        order), so that batch statistics do not depend on the split."""
        return {}

    def position_weights(self, divergence: torch.Tensor) -> torch.Tensor:
        """Weights [L] of a group's response positions from their divergence D_t [L]
        (`position_divergence`), called only under `needs.position_divergence`."""
        raise NotImplementedError

    def sampling_rule(self, entropy: torch.Tensor) -> SamplingRule | None:
        """A per-token sampling rule for the *next* rollout batch, from this batch's
        old-policy entropies at the base temperature; None: plain temperature."""
        return None


def position_divergence(log_probs: torch.Tensor) -> torch.Tensor:
    """TW-GRPO's D_t from one group's full-vocabulary log-probs [G, L, V] (rows past a
    rollout's end hold the uniform distribution): the group mean of KL(p_i,t || g_t),
    g_t the normalised geometric mean of the G distributions at t. Returns [L]. The learner
    computes it under `needs.position_divergence`; `position_weights` turns it into weights."""
    lp = log_probs.double()
    mean_lp = lp.mean(0)
    log_g = mean_lp - torch.logsumexp(mean_lp, dim=-1, keepdim=True)
    return (lp.exp() * (lp - log_g)).sum(-1).mean(0)


class PairLoss(Algorithm):
    """A loss of per-pair sums over tokens (`PairSums`), as the pair learner runs it: it adds
    each micro-batch's `pair_sums` (pair-atomic micro-batches, `algorithms.pairs`) and
    takes `pair_loss` of complete sums; `metrics` reads complete sums too.

    Flags, each with its method: `activation_masks` (m^u = m^d from the reference model's
    activations, `activation_mask`), `learned_masks` (networks trained with the policy on
    the reference's hidden states, `mask_networks`), `critical_weights` (cDPO's weights on
    the rejected tokens come with the data, `REWARD_WEIGHT`), `token_rewards` (T-REG's r_t of
    every token, `token_reward` of the reference's log-probs under `revision_prompts`, `TOKEN_REWARD`)."""

    kind_name = "a pair loss"
    runs = "`rlpost dpo` runs pair losses"
    needs = Needs(reference=True)
    activation_masks: bool = False
    learned_masks: bool = False
    critical_weights: bool = False
    token_rewards: bool = False
    pair_sums = staticmethod(pair_sums)

    def pair_loss(self, sums: PairSums) -> torch.Tensor:
        """The loss of each pair [P]; the mini-batch loss is their mean."""
        raise NotImplementedError

    def metrics(self, sums: PairSums) -> dict[str, float]:
        """Diagnostics from the complete sums of a mini-batch (or an evaluation set)."""
        return {}

    def activation_mask(
        self, activations: Mapping[str, Sequence[torch.Tensor]], valid: torch.Tensor
    ) -> torch.Tensor:
        """The mask [..., T] of each valid token from the reference model's hooked
        activations (per kind, one [..., T, D] per layer), under `activation_masks`."""
        raise NotImplementedError

    def mask_networks(self, num_layers: int, d_model: int, seed: int) -> nn.Module:
        """The mask networks (hidden states per layer -> (m^u, m^d)), initialised from
        `seed` alone so that every learner rank starts from the same ones, under
        `learned_masks`."""
        raise NotImplementedError
