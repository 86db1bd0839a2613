"""CEEH, difficulty-aware entropy regularisation (arXiv 2602.22642; docs/algorithms.md section 8).

"Compress the easy, explore the hard". Per question (a problem, keyed by its prompt) the
controller keeps an EMA of its accuracy (alpha 0.2 when a batch's accuracy is above the EMA,
0.05 when below) and L*, an EMA of its shortest correct length (alpha 0.2 when a batch's
shortest correct response is shorter than L*, 0.05 when longer). In each rollout batch:

- a question is hard (d_q = 1) when its accuracy in the batch is at or below the mean of the
  accuracy EMAs of every question with history; a question never seen before has none and is
  not hard (it can be from its second batch on);
- a correct response of length L gets the length reward max(-0.9, 0.5 (L* - L) / L*),
  added to its reward; 0 for incorrect responses, for a question whose accuracy dropped,
  and for one with no L* yet (no correct response in an earlier batch);
- A is the base advantage (config `advantage`, GRPO's by default) of reward + length
  reward; every token t of a hard question's responses gets A' = A + s(t) min(0.4 H_t,
  |A| / 2), H_t the old policy's entropy at t (the log-prob pass before the advantages,
  at the sampling temperature); the other questions' tokens keep A.

Decisions where the paper leaves room:
- Order: the batch's credit reads the state the earlier batches left; the state is updated
  from the batch only after, so a response never shapes its own credit (as PRIME's PRM).
  Groups of one question twice in a batch both read the earlier state, then update it in
  turn.
- "Accuracy dropped": the batch's accuracy is below the question's EMA before the update.
- "Correct" is the verifier's outcome (`rollouts.correct`), not the reward > 0; the
  accuracy of a question in a batch is its group's fraction of correct responses.
- s(t) = 0.5 (1 + cos(pi min(1, (step - 1) / anneal_steps))): 1 at step 1, 0 from step
  anneal_steps + 1 on; `anneal_steps` null: the run's `steps`.
- H_t below 0 (rounding) counts as 0, and L* as at least one token in the formula.
- The term is added to every token of a hard question's responses, so A' keeps A's sign
  (A > 0: A' >= A; A < 0: A' <= A / 2; A = 0: A' = 0): `balanced` aggregation applies.
- The loss is GRPO's clipped surrogate on A' with the config's clip range, dual-clip,
  aggregation, KL and entropy terms (`credit_base.CreditAlgorithm`).

The per-question state lives in the algorithm object on the controller; `state_dict` puts it
in every checkpoint (JSON), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from rlpost.algorithms.advantages import ADVANTAGES, AdvantageName
from rlpost.algorithms.base import Credit, CreditInputs, Needs
from rlpost.algorithms.credit_base import CreditAlgorithm, CreditConfig


class CEEHConfig(CreditConfig):
    """CEEH's constants (the paper's values by default) and the loss of `CreditConfig`."""

    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "balanced"] = Field(
        "token-mean", description="A' keeps the sign of A: balanced applies"
    )
    advantage: AdvantageName = Field("grpo", description="the base advantage A, of reward + length reward")
    std_eps: float = Field(1e-6, gt=0, description="eps of the grpo advantage's std")
    accuracy_alpha_up: float = Field(0.2, gt=0, le=1, description="EMA weight of an accuracy above the EMA")
    accuracy_alpha_down: float = Field(0.05, gt=0, le=1, description="EMA weight of an accuracy below it")
    entropy_weight: float = Field(0.4, ge=0, description="the 0.4 of min(0.4 H_t, |A| / 2)")
    advantage_cap: float = Field(0.5, ge=0, description="the 1/2 of min(0.4 H_t, |A| / 2)")
    anneal_steps: int | None = Field(
        None, gt=0, description="s(t) reaches 0 at step anneal_steps + 1; null: the run's steps"
    )
    length_scale: float = Field(0.5, ge=0, description="the 0.5 of 0.5 (L* - L) / L*; 0: no length reward")
    length_floor: float = Field(-0.9, le=0, description="the length reward's lower bound")
    length_alpha_shorter: float = Field(0.2, gt=0, le=1, description="EMA weight of a shorter shortest")
    length_alpha_longer: float = Field(0.05, gt=0, le=1, description="EMA weight of a longer shortest")


@dataclass
class Question:
    """What CEEH keeps of one question across batches."""

    accuracy: float  # the EMA of its batch accuracies
    shortest: float | None  # L*, the EMA of its shortest correct length; None: none correct yet


def ema(old: float | None, new: float, alpha_up: float, alpha_down: float) -> float:
    """(1 - alpha) old + alpha new, alpha = alpha_up when new > old, alpha_down when new < old
    (new == old: old either way); `new` when there is no old value."""
    if old is None:
        return new
    alpha = alpha_up if new > old else alpha_down
    return (1 - alpha) * old + alpha * new


def cosine_anneal(step: int, anneal_steps: int) -> float:
    """s(t) = 0.5 (1 + cos(pi min(1, (step - 1) / anneal_steps))), 1 at step 1 down to 0."""
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - 1) / anneal_steps)))


def hard_questions(accuracy: torch.Tensor, seen: torch.Tensor, mean_ema: float | None) -> torch.Tensor:
    """d_q [P] (bool): a question with history (`seen`) whose batch accuracy is at or below
    `mean_ema`, the mean accuracy EMA over every question with history (None: there is none)."""
    if mean_ema is None:
        return torch.zeros_like(seen)
    return seen & (accuracy <= mean_ema)


def length_rewards(
    lengths: torch.Tensor,
    correct: torch.Tensor,
    shortest: torch.Tensor,
    dropped: torch.Tensor,
    scale: float,
    floor: float,
) -> torch.Tensor:
    """max(floor, scale (L* - L) / L*) for each correct response [P, G]; 0 for the others, and
    for every response of a question that `dropped` [P] or has no L* (`shortest` [P] NaN).
    L* counts as at least one token."""
    target = shortest.double().clamp(min=1.0)[:, None]
    reward = (scale * (target - lengths.double()) / target).clamp(min=floor)
    on = correct.bool() & ~dropped[:, None] & ~shortest.isnan()[:, None]
    return torch.where(on, reward, torch.zeros_like(reward))


def entropy_bonus(
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    hard: torch.Tensor,
    anneal: float,
    weight: float,
    cap: float,
) -> torch.Tensor:
    """s(t) d_q min(weight H_t, cap |A_t|) per token (all [T]; `hard` bool)."""
    term = torch.minimum(weight * entropy.double().clamp(min=0.0), cap * advantages.double().abs())
    return anneal * term * hard.double()


class CEEH(CreditAlgorithm):
    name = "ceeh"
    Config = CEEHConfig

    def __init__(self, cfg: CEEHConfig):
        super().__init__(cfg)
        self.needs = Needs(credit_entropy=True, problem_outcomes=True, **self.regulariser_needs())
        self.questions: dict[str, Question] = {}

    def mean_accuracy(self) -> float | None:
        """The mean accuracy EMA over every question with history (None: none has)."""
        if not self.questions:
            return None
        return math.fsum(q.accuracy for q in self.questions.values()) / len(self.questions)

    def credit(self, inputs: CreditInputs) -> Credit:
        c = self.cfg
        anneal_steps = c.anneal_steps or inputs.total_steps
        if anneal_steps is None:
            raise ValueError("ceeh anneals over the run's steps: give CreditInputs.total_steps")
        correct, lengths = inputs.correct.bool(), inputs.lengths
        accuracy = correct.double().mean(1)
        before = [self.questions.get(key) for key in inputs.prompts]
        seen = torch.tensor([q is not None for q in before], dtype=torch.bool)
        hard = hard_questions(accuracy, seen, self.mean_accuracy())
        dropped = torch.tensor([q is not None and a < q.accuracy for q, a in zip(before, accuracy.tolist())])
        shortest = torch.tensor(
            [math.nan if q is None or q.shortest is None else q.shortest for q in before], dtype=torch.float64
        )
        bonus_reward = length_rewards(lengths, correct, shortest, dropped, c.length_scale, c.length_floor)
        advantages = ADVANTAGES[c.advantage](inputs.rewards.double() + bonus_reward, lengths, c.std_eps)
        sizes = lengths.flatten()
        tokens = torch.repeat_interleave(advantages.flatten().double(), sizes)
        hard_tokens = torch.repeat_interleave(hard.repeat_interleave(correct.shape[1]), sizes)
        anneal = cosine_anneal(inputs.step, anneal_steps)
        bonus = entropy_bonus(tokens, inputs.entropy, hard_tokens, anneal, c.entropy_weight, c.advantage_cap)
        self.update(inputs.prompts, accuracy, lengths, correct)
        metrics = {
            "ceeh/hard_frac": hard.double().mean().item() if hard.numel() else 0.0,
            "ceeh/entropy_bonus_mean": bonus[hard_tokens].mean().item() if hard_tokens.any() else 0.0,
            "ceeh/length_reward_mean": bonus_reward[correct].mean().item() if correct.any() else 0.0,
            "ceeh/anneal": anneal,
            "ceeh/questions_seen": float(len(self.questions)),
        }
        return Credit((tokens + bonus).float(), metrics=metrics)

    def update(
        self, keys: list[str], accuracy: torch.Tensor, lengths: torch.Tensor, correct: torch.Tensor
    ) -> None:
        """Each group's question after this batch, in group order: its accuracy EMA and L*
        (the latter only when some response of the group is correct)."""
        c = self.cfg
        for key, acc, group_lengths, group_correct in zip(keys, accuracy.tolist(), lengths, correct):
            q = self.questions.get(key)
            shortest = None if q is None else q.shortest
            if group_correct.any():
                new = float(group_lengths[group_correct].min())
                # a longer shortest moves L* up slowly, a shorter one down fast
                shortest = ema(shortest, new, c.length_alpha_longer, c.length_alpha_shorter)
            accuracy_ema = ema(
                None if q is None else q.accuracy, acc, c.accuracy_alpha_up, c.accuracy_alpha_down
            )
            self.questions[key] = Question(accuracy_ema, shortest)

    def state_dict(self) -> dict:
        return {"questions": {key: [q.accuracy, q.shortest] for key, q in self.questions.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.questions = {key: Question(*v) for key, v in state.get("questions", {}).items()}
