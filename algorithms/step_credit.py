"""Step-level credit: step rewards on tokens, PURE, VinePPO (docs/algorithms.md section 5).

The per-step half of `token_credit` (read its docstring for the layout: flat per-token
tensors in sequence order, `lengths` [S], outcome rewards [P, G]). `step_ends[i]` holds the
exclusive token end of each step of response i, strictly increasing, the last = its length;
an empty response has no steps (or the single end 0).
"""

from __future__ import annotations

import torch

from rlpost.algorithms.token_credit import (
    F64,
    _group_size,
    _leave_one_out_mean,
    _positions,
    _reward_to_go,
    _rloo_outcome,
)


def _checked_steps(step_ends: list[torch.Tensor], lengths: torch.Tensor) -> list[list[int]]:
    """Each response's step ends as a list, checked: strictly increasing, the first >= 1
    (a step has at least one token: its reward needs a last token), the last = the
    response's length. An empty response may list no step or the one end [0]; either way
    it gets [] (it has no tokens to carry anything)."""
    sizes = lengths.tolist()
    if len(step_ends) != len(sizes):
        raise ValueError(f"{len(step_ends)} step_ends for {len(sizes)} responses")
    out = []
    for i, (ends, n) in enumerate(zip(step_ends, sizes)):
        e = torch.as_tensor(ends).flatten().tolist()
        if n == 0:
            if e not in ([], [0]):
                raise ValueError(f"response {i} is empty but has step ends {e}")
            out.append([])
            continue
        if not e:
            raise ValueError(f"response {i} has {n} tokens but no steps")
        if e[0] < 1 or any(b <= a for a, b in zip(e, e[1:])):
            raise ValueError(f"response {i}: step ends {e} are not strictly increasing from >= 1")
        if e[-1] != n:
            raise ValueError(f"response {i}: the last step end {e[-1]} is not its length {n}")
        out.append(e)
    return out


def _step_token_rewards(
    step_rewards: list[torch.Tensor], step_ends: list[torch.Tensor], lengths: torch.Tensor
):
    sizes = lengths.tolist()
    ends = _checked_steps(step_ends, lengths)
    if len(step_rewards) != len(sizes):
        raise ValueError(f"{len(step_rewards)} step_rewards for {len(sizes)} responses")
    device = step_rewards[0].device if step_rewards else torch.device("cpu")
    starts = torch.cumsum(lengths, 0) - lengths
    index, values = [], []
    for i, (e, r) in enumerate(zip(ends, step_rewards)):
        if not e:  # empty response: whatever its single empty step scored has no token
            continue
        if r.numel() != len(e):
            raise ValueError(f"response {i}: {r.numel()} step rewards for {len(e)} steps")
        index.append(int(starts[i]) - 1 + torch.tensor(e, device=device))
        values.append(r.flatten().to(device, F64))
    out = torch.zeros(int(lengths.sum()), dtype=F64, device=device)
    if index:
        out[torch.cat(index)] = torch.cat(values)
    return out


def step_token_rewards(
    step_rewards: list[torch.Tensor], step_ends: list[torch.Tensor], lengths: torch.Tensor
) -> torch.Tensor:
    """Token rewards [T]: response i's step k reward on the step's last token,
    step_ends[i][k] - 1, 0 elsewhere. Raises ValueError, naming the response, when a
    response's ends are not strictly increasing from >= 1 with the last = its length, or
    its reward count is not its step count. An empty response may have no step (or the
    single end [0]); it gets no token."""
    lengths = torch.as_tensor(lengths).flatten().long()
    return _step_token_rewards(step_rewards, step_ends, lengths).float()


def _pure_step_rewards(r: torch.Tensor, form: str, temperature: float = 0.1) -> torch.Tensor:
    r = r.flatten().to(F64)
    if form == "min":
        m = r.flip(0).cummin(0).values.flip(0)  # m_k = min_{k'>=k} r_k'
        m_next = torch.cat([m[1:], m.new_zeros(1)])  # m_{K+1} = 0
        return m - m_next
    if form == "sum":
        return r
    if form == "softmax":
        return torch.softmax(-r / temperature, 0) * r
    raise ValueError(f"unknown PURE form {form!r}: 'min', 'sum' or 'softmax'")


def pure_step_rewards(r: torch.Tensor, form: str, temperature: float = 0.1) -> torch.Tensor:
    """PURE's step rewards [K], placed so that their reward-to-go is each step's credit.

    "min" (the paper's min-form): credit_k = m_k = min_{k'>=k} r_k'; returns
    r'_k = m_k - m_{k+1} with m_{K+1} = 0, so sum_{j>=k} r'_j = m_k.
    "sum": r unchanged (the credit is the plain reward-to-go).
    "softmax" (the authors' code): r*_k = softmax(-r / T)_k r_k over the K steps, T the
    temperature, then summed like "sum"."""
    return _pure_step_rewards(r, form, temperature).float()


def process_advantages(
    step_rewards: list[torch.Tensor],
    step_ends: list[torch.Tensor],
    lengths: torch.Tensor,
    outcome: torch.Tensor,
    form: str = "min",
    temperature: float = 0.1,
) -> torch.Tensor:
    """PURE's per-token advantages [T] with an RLOO baseline and the outcome on the last token.

    G^proc_t = reward_to_go(step_token_rewards(pure_step_rewards(r_i))) within response i;
    b_i = mean_{j != i in i's group} G^proc_{j,0} (each other response's whole process
    return; an empty response's is 0);
    A_t = G^proc_t - b_i + RLOO(outcome)_i, RLOO(R)_i = R_i - mean_{j != i} R_j.

    Why this is "RLOO baseline, outcome reward added at the last token": the outcome R_i at
    the last token adds R_i to every reward-to-go of response i, so the total return is
    G^proc_t + R_i, and a response's whole return is G^proc_{j,0} + R_j. The leave-one-out
    mean of the others' whole returns is b_i + mean_{j != i} R_j, so
    A_t = G^proc_t + R_i - b_i - mean_{j != i} R_j, which splits into the two terms.
    With G = 1 there is no other response: the baseline and the RLOO term are 0 and
    A_t = G^proc_t.
    """
    lengths = torch.as_tensor(lengths).flatten().long()
    group = _group_size(outcome, len(lengths))
    if len(step_rewards) != len(lengths):
        raise ValueError(f"{len(step_rewards)} step_rewards for {len(lengths)} responses")
    transformed = [_pure_step_rewards(r, form, temperature) for r in step_rewards]
    tokens = _step_token_rewards(transformed, step_ends, lengths)
    g_proc = _reward_to_go(tokens, lengths)
    owner, pos = _positions(lengths, g_proc.device)
    whole = torch.zeros(len(lengths), dtype=F64, device=g_proc.device)
    whole[owner[pos == 0]] = g_proc[pos == 0]  # G^proc at the first token; 0 when empty
    per_response = _rloo_outcome(outcome.to(g_proc.device)) - _leave_one_out_mean(whole, group)
    return (g_proc + per_response[owner]).float()


def vine_advantages(
    state_values: list[torch.Tensor],
    step_ends: list[torch.Tensor],
    lengths: torch.Tensor,
    outcome: torch.Tensor,
) -> torch.Tensor:
    """VinePPO's advantages [T]: with V_hat(s_0..s_{K-1}) = state_values[i], the tokens of
    step k carry A_k = V_hat(s_{k+1}) - V_hat(s_k) for k < K - 1 and
    A_{K-1} = R_i - V_hat(s_{K-1}) (gamma = 1, the reward only at the end, V at the
    terminal state 0), so the step advantages of a response sum to R_i - V_hat(s_0).
    `outcome` is R [S]. An empty response's state values are ignored (whatever it holds,
    e.g. the V_hat(s_0) of the prompt): it has no step to carry them."""
    lengths = torch.as_tensor(lengths).flatten().long()
    ends = _checked_steps(step_ends, lengths)
    outcome = outcome.flatten().to(F64)
    if len(state_values) != len(lengths) or outcome.numel() != len(lengths):
        raise ValueError(
            f"{len(state_values)} state_values, {outcome.numel()} outcomes, {len(lengths)} responses"
        )
    device = outcome.device
    values, nexts, sizes = [], [], []
    for i, (e, v) in enumerate(zip(ends, state_values)):
        if not e:
            continue
        v = v.flatten().to(device, F64)
        if v.numel() != len(e):
            raise ValueError(f"response {i}: {v.numel()} state values for {len(e)} steps")
        values.append(v)
        nexts.append(torch.cat([v[1:], outcome[i : i + 1]]))  # V_hat(s_{k+1}), R after the last
        sizes.append(
            torch.diff(
                torch.tensor(e, device=device), prepend=torch.zeros(1, dtype=torch.long, device=device)
            )
        )
    if not values:
        return torch.zeros(int(lengths.sum()), dtype=torch.float32, device=device)
    step_adv = torch.cat(nexts) - torch.cat(values)
    return torch.repeat_interleave(step_adv, torch.cat(sizes)).float()


def merge_steps(step_ends: torch.Tensor, max_steps: int) -> torch.Tensor:
    """At most `max_steps` step ends, merging adjacent steps as evenly as possible.

    With K > max_steps = m ends, K = q m + rem: the merged steps take q + 1 original steps
    each for the first rem and q for the rest, and the kept ends are the last ends of those
    groups (so the last end is always kept). E.g. K = 10, m = 4: groups of 3, 3, 2, 2 keep
    the ends at original indices 2, 5, 7, 9. K <= m returns the input unchanged."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    k = len(step_ends)
    if k <= max_steps:
        return step_ends
    q, rem = divmod(k, max_steps)
    sizes = torch.full((max_steps,), q, dtype=torch.long)
    sizes[:rem] += 1
    return step_ends[(sizes.cumsum(0) - 1).to(step_ends.device)]


# ----------------------------------------------------------------------------- metrics
