"""Per-token credit: returns, GAE, process rewards and token baselines (docs/algorithms.md section 5).

Pure tensor functions over a whole rollout batch. Per-token tensors are 1-D over all
response tokens in sequence order (response 0's tokens, then response 1's, ...);
`lengths` [S] holds the response token counts. With groups of G, response i is in group
i // G and outcome rewards are [P, G]. Per-response lists (`step_ends`, `step_rewards`,
`state_values`) hold one tensor per response in the same order; `step_ends[i]` holds the
exclusive token end of each step of response i, strictly increasing, the last = its length.

Everything is computed in float64 and returned as float32 (the metrics as Python floats).
Responses are processed together on a [S, L_max] padding (padded entries are 0, which is
what a finished response contributes: no reward and V = 0 after its last token), so the
only Python loops are over positions or over responses, never over both.

A zero-length response has no tokens, so it gets none of the outputs, and as a member of
a group it counts with a return of 0 (its outcome reward still counts in the RLOO term).
"""

from __future__ import annotations

import torch

from rlpost.algorithms.advantages import rloo

F64 = torch.float64
WHITEN_EPS = 1e-8  # (x - mean) / (std + 1e-8)
OTB_EPS = 1e-8  # B_t = sum G W / (sum W + 1e-8)


# ----------------------------------------------------------------------------- layout


def _lengths(lengths: torch.Tensor, tokens: int) -> torch.Tensor:
    """`lengths` as a 1-D long tensor, checked against the number of tokens."""
    lengths = torch.as_tensor(lengths).flatten().long()
    if (lengths < 0).any():
        raise ValueError("lengths must be non-negative")
    if int(lengths.sum()) != tokens:
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {tokens} tokens")
    return lengths


def _positions(lengths: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token, its response index and its 0-based position within the response."""
    lengths = lengths.to(device)
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(int(lengths.sum()), device=device) - starts[owner]
    return owner, pos


def _pad(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Flat per-token x [T] -> [S, L_max] float64, zeros after each response's end."""
    owner, pos = _positions(lengths, x.device)
    width = int(lengths.max()) if len(lengths) else 0
    out = torch.zeros(len(lengths), width, dtype=F64, device=x.device)
    out[owner, pos] = x.to(F64)
    return out


def _unpad(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    owner, pos = _positions(lengths, padded.device)
    return padded[owner, pos]


def _suffix_sum(padded: torch.Tensor, coef: float) -> torch.Tensor:
    """out[:, t] = sum_{l>=0} coef^l x[:, t+l] along each row of [S, L]."""
    if coef == 1.0:
        return padded.flip(1).cumsum(1).flip(1)
    # a closed form via coef^-t overflows / loses precision over 2k tokens; a scan over
    # positions is exact and vectorised across responses
    out = torch.zeros_like(padded)
    running = torch.zeros(padded.shape[0], dtype=padded.dtype, device=padded.device)
    for t in range(padded.shape[1] - 1, -1, -1):
        running = padded[:, t] + coef * running
        out[:, t] = running
    return out


def _per_response_sum(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    owner, _ = _positions(lengths, x.device)
    return torch.zeros(len(lengths), dtype=F64, device=x.device).index_add(0, owner, x.to(F64))


def _leave_one_out_mean(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """mean_{j != i} x_j over i's group, for x [S] group-major; 0 for groups of one."""
    if group_size < 2:
        return torch.zeros_like(x)
    groups = x.view(-1, group_size)
    return ((groups.sum(1, keepdim=True) - groups) / (group_size - 1)).flatten()


def _group_size(outcome: torch.Tensor, responses: int) -> int:
    if outcome.dim() != 2 or outcome.numel() != responses:
        raise ValueError(
            f"outcome must be [P, G] with P * G = {responses} responses, got {tuple(outcome.shape)}"
        )
    return outcome.shape[1]


def _rloo_outcome(outcome: torch.Tensor) -> torch.Tensor:
    return rloo(outcome.to(F64)).flatten()


# ----------------------------------------------------------------------------- returns, GAE


def _reward_to_go(token_rewards: torch.Tensor, lengths: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    lengths = _lengths(lengths, token_rewards.numel())
    return _unpad(_suffix_sum(_pad(token_rewards, lengths), gamma), lengths)


def reward_to_go(token_rewards: torch.Tensor, lengths: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{j>=t} gamma^(j-t) r_j within each response [T]."""
    return _reward_to_go(token_rewards, lengths, gamma).float()


def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation within each response:
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t), with V after the last token = 0;
    A_t = sum_l (gamma lam)^l delta_{t+l}; R_t = A_t + V(s_t). Returns (A, R), each [T]."""
    lengths = _lengths(lengths, token_rewards.numel())
    if values.numel() != token_rewards.numel():
        raise ValueError(f"{values.numel()} values for {token_rewards.numel()} tokens")
    r = _pad(token_rewards, lengths)
    v = _pad(values, lengths)
    # the padding is 0, so V(s_{t+1}) is 0 past each response's last token
    v_next = torch.nn.functional.pad(v[:, 1:], (0, 1))
    delta = r + gamma * v_next - v
    adv = _suffix_sum(delta, gamma * lam)
    adv_flat = _unpad(adv, lengths)
    returns = adv_flat + values.to(F64)
    return adv_flat.float(), returns.float()


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / (std + 1e-8) with the mean and the population std (no Bessel
    correction) over the entries where `mask` is true (all entries when None). Entries
    outside the mask are returned as 0, as is everything when the mask selects nothing."""
    x64 = x.to(F64)
    if mask is None:
        mask = torch.ones_like(x64, dtype=torch.bool)
    mask = mask.to(torch.bool)
    if not mask.any():
        return torch.zeros_like(x64).float()
    sel = x64[mask]
    mean = sel.mean()
    std = (sel - mean).square().mean().sqrt()
    out = torch.where(mask, (x64 - mean) / (std + WHITEN_EPS), torch.zeros_like(x64))
    return out.float()


# ----------------------------------------------------------------------------- steps


def prime_advantages(
    token_rewards: torch.Tensor, lengths: torch.Tensor, outcome: torch.Tensor
) -> torch.Tensor:
    """PRIME's advantages [T] (the paper's leave-one-out form):
    b_i = mean_{j != i in i's group} (mean_t r_{j,t}), an empty response's mean being 0
    (it still counts among the G - 1);
    A_t = sum_{s>=t} (r_{i,s} - b_i) + RLOO(outcome)_i. With G = 1, b_i and RLOO are 0."""
    lengths = _lengths(lengths, token_rewards.numel())
    group = _group_size(outcome, len(lengths))
    r = token_rewards.to(F64)
    means = _per_response_sum(r, lengths.to(r.device)) / lengths.to(r.device).clamp(min=1)
    baseline = _leave_one_out_mean(means, group)
    owner, _ = _positions(lengths, r.device)
    rtg = _reward_to_go(r - baseline[owner], lengths)
    return (rtg + _rloo_outcome(outcome.to(r.device))[owner]).float()


def optimal_token_baseline(
    returns: torch.Tensor,
    p_sampled: torch.Tensor,
    collision: torch.Tensor,
    lengths: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """The optimal token baseline's advantages [T]:
    W_t = sum_{j<=t} (1 - 2 p_j + collision_j) within a response (p_j the old policy's
    probability of the sampled token, collision_j = sum_v pi_j(v)^2);
    B_t = sum_i G_t^i W_t^i / (sum_i W_t^i + 1e-8) over the group's responses whose length
    is > t; A_t = G_t - B_t (no std normalisation). `returns` is G_t per token. A group of
    one gives B_t = G_t W_t / (W_t + 1e-8), so A_t is ~0 rather than exactly 0."""
    lengths = _lengths(lengths, returns.numel())
    if len(lengths) % group_size:
        raise ValueError(f"{len(lengths)} responses do not form groups of {group_size}")
    g = _pad(returns, lengths)
    w_step = _pad(1.0 - 2.0 * p_sampled.to(F64) + collision.to(F64), lengths)
    w = w_step.cumsum(1)
    reach = _pad(torch.ones_like(returns, dtype=F64), lengths) > 0
    w = torch.where(reach, w, torch.zeros_like(w))  # the cumsum runs on past the end
    width = g.shape[1]
    gw = (g * w).view(-1, group_size, width).sum(1)
    wsum = w.view(-1, group_size, width).sum(1)
    baseline = (gw / (wsum + OTB_EPS)).repeat_interleave(group_size, 0)
    return _unpad(g - baseline, lengths).float()


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) with population variances over all tokens; nan when
    Var(R) == 0 (no spread to explain, including an empty batch)."""
    v, r = values.to(F64).flatten(), returns.to(F64).flatten()
    if r.numel() == 0:
        return float("nan")
    var_r = (r - r.mean()).square().mean()
    if var_r == 0:
        return float("nan")
    diff = r - v
    return float(1.0 - (diff - diff.mean()).square().mean() / var_r)


def position_bucket_metrics(
    advantages: torch.Tensor, lengths: torch.Tensor, edges: tuple[int, ...] = (0, 16, 32, 64, 128, 256)
) -> dict[str, float]:
    """Mean and population std of the per-token advantages by the token's 0-based position
    in its response, bucketed [e_k, e_{k+1}) plus a last bucket [e_last, inf). Keys
    "advantage/pos_{lo}_{hi}/mean" and ".../std" with hi = e_{k+1} - 1, the last bucket
    "advantage/pos_{lo}_up/..."; a bucket without tokens has no keys."""
    lengths = _lengths(lengths, advantages.numel())
    a = advantages.to(F64).flatten()
    _, pos = _positions(lengths, a.device)
    out: dict[str, float] = {}
    bounds = list(zip(edges, list(edges[1:]) + [None]))
    for lo, hi in bounds:
        sel = pos >= lo if hi is None else (pos >= lo) & (pos < hi)
        if not sel.any():
            continue
        x = a[sel]
        mean = x.mean()
        name = f"advantage/pos_{lo}_up" if hi is None else f"advantage/pos_{lo}_{hi - 1}"
        out[f"{name}/mean"] = float(mean)
        out[f"{name}/std"] = float((x - mean).square().mean().sqrt())
    return out
