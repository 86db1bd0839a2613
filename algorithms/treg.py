"""T-REG (docs/algorithms.md section 8): DPO regularised by token rewards the reference model
gives itself under two contrastive revision prompts.

    r_t = sigmoid(log pi_ref(y_t | x_better, y_<t) - log pi_ref(y_t | x_worse, y_<t)) - 0.5
    L_REG(y) = -beta sum_t r_t log pi_theta(y_t)
    L = L_DPO + alpha w (L_REG(y_w) + L_REG(y_l)),  w = sg(sigmoid(beta (Delta_l - Delta_w)))

r_t comes from the frozen reference, so it is a constant of the data: the runtime computes
it once before training (rlpost/jobs/treg.py) and hands it to `pair_sums` as
`token_reward`, which adds sum_t r_t log pi_theta(y_t) to `PairSums.reg`. The loss is then a
function of complete per-pair sums like every pair loss, and exact under any split.
"""

from __future__ import annotations

import torch
from torch import nn

from rlpost.algorithms.pairs import CHOSEN, REJECTED, PairSums

PLACEHOLDER = "{prompt}"  # where a revision prompt puts the pair's own prompt
# The default pair, in our words after the paper's four qualities (helpful, correct,
# coherent, concise) and their opposites. Printable ASCII: the tiny models' alphabet.
BETTER_PROMPT = "{prompt}\n\n(Answer as well as you can: helpful, correct, coherent and concise.)"
WORSE_PROMPT = "{prompt}\n\n(Answer badly on purpose: unhelpful, incorrect, incoherent and verbose.)"


def token_reward(better_logp: torch.Tensor, worse_logp: torch.Tensor) -> torch.Tensor:
    """r_t from the reference's log-probs of the same tokens under the better and the worse
    prompt. sigmoid(x) - 0.5 is computed as tanh(x / 2) / 2, which does not cancel near 0."""
    return 0.5 * torch.tanh(0.5 * (better_logp - worse_logp))


def treg_loss(s: PairSums, beta: float = 0.1, alpha: float = 0.25) -> torch.Tensor:
    """L_DPO + alpha w (L_REG(y_w) + L_REG(y_l)) of each pair [P]; w carries no gradient."""
    reg = s.required("reg", "treg")
    margin = beta * (s.delta[:, CHOSEN] - s.delta[:, REJECTED])
    weight = torch.sigmoid(-margin).detach()
    return -nn.functional.logsigmoid(margin) - alpha * weight * beta * (reg[:, CHOSEN] + reg[:, REJECTED])


def treg_metrics(s: PairSums, beta: float, alpha: float) -> dict[str, torch.Tensor]:
    """Mean r_t per token of each side, mean w over the pairs, and the regulariser's share of
    the loss, alpha w (L_REG(y_w) + L_REG(y_l)), mean over the pairs (`loss` minus it is
    L_DPO's mean)."""
    tokens, total = s.tokens, s.token_reward
    weight = torch.sigmoid(beta * (s.delta[:, REJECTED] - s.delta[:, CHOSEN]))
    return {
        "treg/token_reward_chosen": total[:, CHOSEN].sum() / tokens[:, CHOSEN].sum(),
        "treg/token_reward_rejected": total[:, REJECTED].sum() / tokens[:, REJECTED].sum(),
        "treg/weight": weight.mean(),
        "treg/reg_loss": (-alpha * weight * beta * (s.reg[:, CHOSEN] + s.reg[:, REJECTED])).mean(),
    }
