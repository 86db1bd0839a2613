"""Process rewards with PURE's min-form credit (arXiv 2504.15275; docs/algorithms.md section 5).

A step verifier or a PRM gives each step of a response a reward r_1..r_K
(`step_credit.reward`, steps split by `step_credit.split`). The credit of step k is
min_{k' >= k} r_{k'}, the worst step still to come (`form: min`, the default), instead
of the sum (`form: sum`); `form: softmax` is the authors' approximation r*_k =
softmax(-r / T)_k r_k, summed. Each step's transformed reward sits on its last token, the
outcome reward on the response's last token; the advantage of a token is its reward-to-go
minus the leave-one-out mean over the group of the other responses' whole returns
(`step_credit.process_advantages`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlpost.algorithms.base import Conditional, Credit, CreditInputs, Needs
from rlpost.algorithms.credit_base import CreditAlgorithm, CreditConfig
from rlpost.algorithms.step_credit import process_advantages


class PUREConfig(CreditConfig):
    form: Literal["min", "sum", "softmax"] = "min"
    temperature: float = Field(0.1, gt=0, description="T of form 'softmax'")

    conditionals = (Conditional("temperature", "form", ("softmax",), "set algorithm.form: softmax"),)


class PURE(CreditAlgorithm):
    name = "pure"
    Config = PUREConfig

    def __init__(self, cfg: PUREConfig):
        super().__init__(cfg)
        self.needs = Needs(step_rewards=True, **self.regulariser_needs())

    def credit(self, inputs: CreditInputs) -> Credit:
        advantages = process_advantages(
            inputs.step_rewards,
            inputs.step_ends,
            inputs.lengths.flatten(),
            inputs.rewards,
            self.cfg.form,
            self.cfg.temperature,
        )
        return Credit(advantages.float())
