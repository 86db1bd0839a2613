"""Per-token credit (docs/algorithms.md section 5) against plain-Python loops written from the
formulas, per response and per token, and against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms.step_credit import (
    merge_steps,
    process_advantages,
    pure_step_rewards,
    step_token_rewards,
    vine_advantages,
)
from rlpost.algorithms.token_credit import (
    explained_variance,
    gae,
    optimal_token_baseline,
    position_bucket_metrics,
    prime_advantages,
    reward_to_go,
    whiten,
)

F64 = torch.float64
TOL = dict(rtol=1e-5, atol=1e-5)  # the results are float32


def close(actual, expected, **kw):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, **(kw or TOL))


# ----------------------------------------------------------------------------- loop references


def split(flat, lengths):
    """Flat [T] -> list of per-response Python lists."""
    out, i = [], 0
    for n in lengths:
        out.append([float(x) for x in flat[i : i + n]])
        i += n
    return out


def ref_rtg(r, gamma=1.0):
    return [sum(gamma ** (j - t) * r[j] for j in range(t, len(r))) for t in range(len(r))]


def ref_gae(r, v, gamma, lam):
    n = len(r)
    delta = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
    adv = [sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)]
    return adv, [a + x for a, x in zip(adv, v)]


def ref_pure(r, form, temperature=0.1):
    k = len(r)
    if form == "sum":
        return list(r)
    if form == "min":
        m = [min(r[j:]) for j in range(k)] + [0.0]
        return [m[j] - m[j + 1] for j in range(k)]
    z = [math.exp(-x / temperature) for x in r]
    return [zi / sum(z) * x for zi, x in zip(z, r)]


def ref_step_tokens(rewards, ends, n):
    out = [0.0] * n
    for r, e in zip(rewards, ends):
        out[e - 1] = r
    return out


def loo(values, i, group):
    """mean over j != i of i's group (0 with no other member)."""
    g0 = (i // group) * group
    others = [values[j] for j in range(g0, g0 + group) if j != i]
    return sum(others) / len(others) if others else 0.0


def ref_rloo(outcome, i, group):
    """R_i - mean_{j != i} R_j; 0 in a group of one (no other response to compare with)."""
    return outcome[i] - loo(outcome, i, group) if group > 1 else 0.0


def ref_process(step_rewards, step_ends, lengths, outcome, form, temperature=0.1):
    group = len(outcome[0])
    flat_outcome = [x for row in outcome for x in row]
    g_proc = []
    for r, e, n in zip(step_rewards, step_ends, lengths):
        rr = ref_pure([float(x) for x in r], form, temperature) if n else []
        g_proc.append(ref_rtg(ref_step_tokens(rr, [int(x) for x in e], n)))
    whole = [g[0] if g else 0.0 for g in g_proc]
    out = []
    for i, g in enumerate(g_proc):
        extra = -loo(whole, i, group) + ref_rloo(flat_outcome, i, group)
        out += [x + extra for x in g]
    return out


def ref_prime(token_rewards, lengths, outcome):
    group = len(outcome[0])
    flat_outcome = [x for row in outcome for x in row]
    per = split(token_rewards, lengths)
    means = [sum(r) / len(r) if r else 0.0 for r in per]
    out = []
    for i, r in enumerate(per):
        b = loo(means, i, group)
        rloo_i = ref_rloo(flat_outcome, i, group)
        out += [sum(r[s] - b for s in range(t, len(r))) + rloo_i for t in range(len(r))]
    return out


def ref_otb(returns, p, collision, lengths, group):
    g, pp, cc = split(returns, lengths), split(p, lengths), split(collision, lengths)
    w = [[sum(1 - 2 * pi[j] + ci[j] for j in range(t + 1)) for t in range(len(pi))] for pi, ci in zip(pp, cc)]
    out = []
    for i, gi in enumerate(g):
        g0 = (i // group) * group
        for t in range(len(gi)):
            members = [j for j in range(g0, g0 + group) if lengths[j] > t]
            b = sum(g[j][t] * w[j][t] for j in members) / (sum(w[j][t] for j in members) + 1e-8)
            out.append(gi[t] - b)
    return out


def ref_vine(values, ends, lengths, outcome):
    out = []
    for v, e, n, r in zip(values, ends, lengths, outcome):
        if n == 0:
            continue
        v, e = [float(x) for x in v], [int(x) for x in e]
        k = len(e)
        starts = [0] + e[:-1]
        for s in range(k):
            a = (v[s + 1] if s + 1 < k else float(r)) - v[s]
            out += [a] * (e[s] - starts[s])
    return out


# ----------------------------------------------------------------------------- batches


def random_lengths(gen, n, with_edge=True):
    lengths = torch.randint(0, 12, (n,), generator=gen).tolist()
    if with_edge:
        lengths[0], lengths[1] = 0, 1  # a zero-length and a length-1 response
    return lengths


def random_steps(gen, lengths):
    ends = []
    for n in lengths:
        if n == 0:
            ends.append(torch.zeros(0, dtype=torch.long))
            continue
        cuts = sorted(set(torch.randint(1, n + 1, (3,), generator=gen).tolist()) | {n})
        ends.append(torch.tensor(cuts, dtype=torch.long))
    return ends


SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------- reward-to-go, GAE


def test_reward_to_go_hand_numbers():
    # gamma 0.5 on [1, 2, 4]: [1 + 1 + 1, 2 + 2, 4]; the empty response gets nothing
    close(
        reward_to_go(torch.tensor([1.0, 2.0, 4.0, 5.0]), torch.tensor([3, 0, 1]), 0.5), [3.0, 4.0, 4.0, 5.0]
    )
    close(reward_to_go(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2, 1])), [3.0, 2.0, 4.0])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reward_to_go_matches_loop(seed, gamma):
    gen = torch.Generator().manual_seed(seed)
    lengths = random_lengths(gen, 9)
    r = torch.randn(sum(lengths), generator=gen, dtype=F64)
    expected = [x for rr in split(r, lengths) for x in ref_rtg(rr, gamma)]
    close(reward_to_go(r, torch.tensor(lengths), gamma), expected)


def test_gae_hand_numbers():
    # gamma 0.9, lam 0.8, r = [0, 0, 1], V = [0.5, 0.6, 0.7]:
    # delta = [0.9*0.6 - 0.5, 0.9*0.7 - 0.6, 1 - 0.7] = [0.04, 0.03, 0.3]
    # A_2 = 0.3; A_1 = 0.03 + 0.72*0.3 = 0.246; A_0 = 0.04 + 0.72*0.246 = 0.21712
    # then a length-1 response (r 2, V 0.5): A = 1.5, R = 2
    adv, ret = gae(
        torch.tensor([0.0, 0.0, 1.0, 2.0]),
        torch.tensor([0.5, 0.6, 0.7, 0.5]),
        torch.tensor([3, 0, 1]),
        0.9,
        0.8,
    )
    close(adv, [0.21712, 0.246, 0.3, 1.5])
    close(ret, [0.71712, 0.846, 1.0, 2.0])


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_matches_loop_and_limits(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = random_lengths(gen, 9)
    t = sum(lengths)
    r, v = torch.randn(t, generator=gen, dtype=F64), torch.randn(t, generator=gen, dtype=F64)
    rs, vs = split(r, lengths), split(v, lengths)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)]:
        adv, ret = gae(r, v, torch.tensor(lengths), gamma, lam)
        pairs = [ref_gae(a, b, gamma, lam) for a, b in zip(rs, vs)]
        close(adv, [x for a, _ in pairs for x in a])
        close(ret, [x for _, b in pairs for x in b])
    # lam = 1, gamma = 1: A_t = G_t - V_t
    adv, ret = gae(r, v, torch.tensor(lengths), 1.0, 1.0)
    close(adv, (reward_to_go(r, torch.tensor(lengths)).double() - v).float())
    close(ret, reward_to_go(r, torch.tensor(lengths)))
    # lam = 0: A_t = delta_t
    adv, _ = gae(r, v, torch.tensor(lengths), 0.9, 0.0)
    delta = [
        r_t + 0.9 * (vv[t + 1] if t + 1 < len(vv) else 0.0) - vv[t]
        for rr, vv in zip(rs, vs)
        for t, r_t in enumerate(rr)
    ]
    close(adv, delta)


# ----------------------------------------------------------------------------- whiten, metrics


def test_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    s = math.sqrt(2 / 3)  # population std of 1, 2, 3
    close(whiten(x, torch.tensor([True, True, True, False])), [-1 / s, 0.0, 1 / s, 0.0])
    y = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=F64)
    w = whiten(y).double()
    assert abs(w.mean()) < 1e-6 and abs(w.square().mean().sqrt() - 1) < 1e-6
    close(whiten(x, torch.zeros(4, dtype=torch.bool)), [0.0] * 4)
    assert whiten(torch.zeros(0)).numel() == 0


def test_explained_variance():
    # R - V = [0, 0, 1]: Var 2/9; Var R = 2/3 -> 1 - 1/3
    assert explained_variance(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(
        2 / 3
    )
    r = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert explained_variance(r, r) == pytest.approx(1.0)
    assert math.isnan(explained_variance(torch.zeros(3), torch.ones(3)))
    assert math.isnan(explained_variance(torch.zeros(0), torch.zeros(0)))


def test_position_bucket_metrics_hand_numbers():
    # positions [0, 1, 2, 0]: bucket [0, 2) holds 1, 2, 4; bucket [2, inf) holds 3; [5, inf) is empty
    m = position_bucket_metrics(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([3, 0, 1]), edges=(0, 2))
    assert set(m) == {
        "advantage/pos_0_1/mean",
        "advantage/pos_0_1/std",
        "advantage/pos_2_up/mean",
        "advantage/pos_2_up/std",
    }
    assert m["advantage/pos_0_1/mean"] == pytest.approx(7 / 3)
    assert m["advantage/pos_0_1/std"] == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3)
    )
    assert m["advantage/pos_2_up/mean"] == 3.0 and m["advantage/pos_2_up/std"] == 0.0
    assert "advantage/pos_5_up/mean" not in position_bucket_metrics(
        torch.tensor([1.0]), torch.tensor([1]), (0, 5)
    )


def test_position_bucket_metrics_matches_loop():
    gen = torch.Generator().manual_seed(3)
    lengths = [0, 1, 40, 17, 70, 3]
    a = torch.randn(sum(lengths), generator=gen, dtype=F64)
    edges = (0, 16, 32, 64)
    m = position_bucket_metrics(a, torch.tensor(lengths), edges)
    buckets: dict[str, list[float]] = {}
    for resp in split(a, lengths):
        for t, x in enumerate(resp):
            k = max(i for i, e in enumerate(edges) if t >= e)
            name = f"pos_{edges[k]}_{edges[k + 1] - 1}" if k + 1 < len(edges) else f"pos_{edges[k]}_up"
            buckets.setdefault(name, []).append(x)
    assert len(m) == 2 * len(buckets)
    for name, xs in buckets.items():
        mean = sum(xs) / len(xs)
        assert m[f"advantage/{name}/mean"] == pytest.approx(mean)
        assert m[f"advantage/{name}/std"] == pytest.approx(
            math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        )


# ----------------------------------------------------------------------------- steps, PURE


def test_step_token_rewards_hand_numbers_and_validation():
    lengths = torch.tensor([3, 0, 2, 1])
    ends = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.long), torch.tensor([2]), torch.tensor([1])]
    rewards = [torch.tensor([0.5, 1.0]), torch.zeros(0), torch.tensor([2.0]), torch.tensor([-1.0])]
    close(step_token_rewards(rewards, ends, lengths), [0.5, 0.0, 1.0, 0.0, 2.0, -1.0])
    # an empty response may also carry the single end [0] (its reward has no token)
    ends[1], rewards[1] = torch.tensor([0]), torch.tensor([7.0])
    close(step_token_rewards(rewards, ends, lengths), [0.5, 0.0, 1.0, 0.0, 2.0, -1.0])
    for bad, i in [
        ([torch.tensor([1, 2]), ends[1], ends[2], ends[3]], 0),  # last end != length
        ([ends[0], ends[1], torch.tensor([2, 2]), ends[3]], 2),  # not increasing
        ([ends[0], ends[1], ends[2], torch.zeros(0, dtype=torch.long)], 3),  # no step in a non-empty response
        ([ends[0], torch.tensor([1]), ends[2], ends[3]], 1),  # steps beyond an empty response
        ([torch.tensor([0, 3]), ends[1], ends[2], ends[3]], 0),  # an empty step
    ]:
        with pytest.raises(ValueError, match=f"response {i}"):
            step_token_rewards(rewards, bad, lengths)


def test_pure_step_rewards_hand_numbers():
    r = torch.tensor([0.2, -0.5, 0.3])
    # m = [-0.5, -0.5, 0.3], m_next = [-0.5, 0.3, 0] -> [0, -0.8, 0.3]
    close(pure_step_rewards(r, "min"), [0.0, -0.8, 0.3])
    close(pure_step_rewards(r, "sum"), [0.2, -0.5, 0.3])
    # T = 1 on [0, ln 2]: softmax(-r) = [2/3, 1/3] -> [0, ln2 / 3]
    close(pure_step_rewards(torch.tensor([0.0, math.log(2)]), "softmax", 1.0), [0.0, math.log(2) / 3])
    assert pure_step_rewards(torch.zeros(0), "min").numel() == 0
    with pytest.raises(ValueError, match="form"):
        pure_step_rewards(r, "max")


@pytest.mark.parametrize("seed", SEEDS)
def test_pure_step_rewards_properties(seed):
    gen = torch.Generator().manual_seed(seed)
    for k in [1, 2, 7]:
        r = torch.randn(k, generator=gen, dtype=F64)
        rr = r.tolist()
        rtg_min = ref_rtg(pure_step_rewards(r, "min").double().tolist())
        close(torch.tensor(rtg_min, dtype=torch.float32), [min(rr[j:]) for j in range(k)])  # suffix minimum
        close(pure_step_rewards(r, "min"), ref_pure(rr, "min"))
        close(pure_step_rewards(r, "softmax", 0.1), ref_pure(rr, "softmax", 0.1))
        # "sum": the reward-to-go is the plain reward-to-go of r
        close(
            torch.tensor(ref_rtg(pure_step_rewards(r, "sum").double().tolist()), dtype=torch.float32),
            ref_rtg(rr),
        )


def test_process_advantages_hand_numbers():
    # group of 2. Response 0: 3 tokens, steps end at 1 and 3, rewards [1.0, 0.5] -> min-form [0, 0.5]
    # on tokens [0, 0, 0.5] -> G_proc [0.5, 0.5, 0.5]. Response 1: 2 tokens, one step, reward -1
    # -> G_proc [-1, -1]. Outcomes [1, 0]: RLOO [1, -1]; baselines b_0 = -1, b_1 = 0.5.
    # A_0 = 0.5 + 1 + 1 = 2.5; A_1 = -1 - 0.5 - 1 = -2.5
    a = process_advantages(
        [torch.tensor([1.0, 0.5]), torch.tensor([-1.0])],
        [torch.tensor([1, 3]), torch.tensor([2])],
        torch.tensor([3, 2]),
        torch.tensor([[1.0, 0.0]]),
    )
    close(a, [2.5, 2.5, 2.5, -2.5, -2.5])
    # form "sum": response 0's G_proc [1.5, 0.5, 0.5], b_1 = 1.5; A_0 = G + 1 + 1, A_1 = -1 - 1.5 - 1
    a = process_advantages(
        [torch.tensor([1.0, 0.5]), torch.tensor([-1.0])],
        [torch.tensor([1, 3]), torch.tensor([2])],
        torch.tensor([3, 2]),
        torch.tensor([[1.0, 0.0]]),
        form="sum",
    )
    close(a, [3.5, 2.5, 2.5, -3.5, -3.5])


def test_process_advantages_group_of_one_and_empty():
    # G = 1: no baseline, no RLOO term -> the process reward-to-go alone
    a = process_advantages(
        [torch.tensor([1.0, 0.5]), torch.zeros(0)],
        [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.long)],
        torch.tensor([3, 0]),
        torch.tensor([[1.0], [0.0]]),
    )
    close(a, [0.5, 0.5, 0.5])
    # an empty group-mate counts 0 in the baseline and its outcome in RLOO: b_0 = 0, RLOO_0 = 1 - 0
    a = process_advantages(
        [torch.tensor([1.0, 0.5]), torch.zeros(0)],
        [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.long)],
        torch.tensor([3, 0]),
        torch.tensor([[1.0, 0.0]]),
    )
    close(a, [1.5, 1.5, 1.5])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("form", ["min", "sum", "softmax"])
@pytest.mark.parametrize("group", [1, 3])
def test_process_advantages_matches_loop(seed, form, group):
    gen = torch.Generator().manual_seed(seed)
    lengths = random_lengths(gen, 9)
    ends = random_steps(gen, lengths)
    rewards = [torch.randn(len(e), generator=gen, dtype=F64) for e in ends]
    outcome = torch.randint(0, 2, (len(lengths) // group, group), generator=gen).double()
    a = process_advantages(rewards, ends, torch.tensor(lengths), outcome, form, 0.5)
    close(a, ref_process(rewards, ends, lengths, outcome.tolist(), form, 0.5))


# ----------------------------------------------------------------------------- PRIME


def test_prime_hand_numbers():
    # group of 2: response 0 rewards [1, 3] (mean 2), response 1 [4] (mean 4); outcomes [1, 0].
    # b_0 = 4, b_1 = 2. A_0 = rtg([-3, -1]) + 1 = [-3, 0]; A_1 = (4 - 2) - 1 = 1
    close(
        prime_advantages(torch.tensor([1.0, 3.0, 4.0]), torch.tensor([2, 1]), torch.tensor([[1.0, 0.0]])),
        [-3.0, 0.0, 1.0],
    )
    # an empty group-mate has mean 0 and still counts: b_0 = (0 + 4) / 2 = 2, b_2 = (2 + 0) / 2 = 1
    a = prime_advantages(
        torch.tensor([1.0, 3.0, 4.0]), torch.tensor([2, 0, 1]), torch.tensor([[0.0, 0.0, 0.0]])
    )
    close(a, [0.0, 1.0, 3.0])
    # G = 1: the plain reward-to-go
    close(
        prime_advantages(torch.tensor([1.0, 3.0, 4.0]), torch.tensor([2, 1]), torch.tensor([[1.0], [0.0]])),
        [4.0, 3.0, 4.0],
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group", [1, 4])
def test_prime_matches_loop(seed, group):
    gen = torch.Generator().manual_seed(seed)
    lengths = random_lengths(gen, 8)
    r = torch.randn(sum(lengths), generator=gen, dtype=F64)
    outcome = torch.randint(0, 2, (8 // group, group), generator=gen).double()
    close(prime_advantages(r, torch.tensor(lengths), outcome), ref_prime(r, lengths, outcome.tolist()))


# ----------------------------------------------------------------------------- optimal token baseline


def test_otb_hand_numbers():
    # group of 2. Response 0: G = [1, 1], p = 0.5, collision 0.5 -> w 0.5 per token, W = [0.5, 1].
    # Response 1: G = [0], p = 0, collision 0.25 -> W = [1.25].
    # t = 0: B = 0.5 / 1.75 -> A = [1 - 2/7, -2/7]; t = 1: response 0 alone, B = 1 / (1 + 1e-8)
    a = optimal_token_baseline(
        torch.tensor([1.0, 1.0, 0.0]),
        torch.tensor([0.5, 0.5, 0.0]),
        torch.tensor([0.5, 0.5, 0.25]),
        torch.tensor([2, 1]),
        2,
    )
    close(a, [5 / 7, 1 - 1 / (1 + 1e-8), -2 / 7])


@pytest.mark.parametrize("seed", SEEDS)
def test_otb_matches_loop_and_equal_weights(seed):
    gen = torch.Generator().manual_seed(seed)
    group = 4
    lengths = random_lengths(gen, 12)
    t = sum(lengths)
    g = torch.randn(t, generator=gen, dtype=F64)
    p = torch.rand(t, generator=gen, dtype=F64)
    c = p.square() + torch.rand(t, generator=gen, dtype=F64) * (1 - p).square()
    a = optimal_token_baseline(g, p, c, torch.tensor(lengths), group)
    close(a, ref_otb(g, p, c, lengths, group))
    # all W equal (1 - 2p + c the same everywhere): B_t is the mean of G_t over the responses reaching t
    ones = torch.full((t,), 0.3, dtype=F64)
    a = optimal_token_baseline(g, ones, ones.square(), torch.tensor(lengths), group)
    gs = split(g, lengths)
    expected = []
    for i, gi in enumerate(gs):
        g0 = (i // group) * group
        for tt in range(len(gi)):
            reach = [gs[j][tt] for j in range(g0, g0 + group) if lengths[j] > tt]
            expected.append(gi[tt] - sum(reach) / len(reach))
    close(a, expected)


# ----------------------------------------------------------------------------- VinePPO


def test_vine_hand_numbers():
    # 5 tokens in steps [0, 2) and [2, 5), V = [0.5, 0.8], R = 1 -> A = 0.3 twice, 0.2 three times;
    # an empty response (its V_hat(s_0) ignored); one token, V = [0.4], R = 0 -> -0.4
    a = vine_advantages(
        [torch.tensor([0.5, 0.8]), torch.tensor([0.5]), torch.tensor([0.4])],
        [torch.tensor([2, 5]), torch.zeros(0, dtype=torch.long), torch.tensor([1])],
        torch.tensor([5, 0, 1]),
        torch.tensor([1.0, 1.0, 0.0]),
    )
    close(a, [0.3, 0.3, 0.2, 0.2, 0.2, -0.4])
    with pytest.raises(ValueError, match="response 0"):
        vine_advantages([torch.tensor([0.5])], [torch.tensor([2, 5])], torch.tensor([5]), torch.tensor([1.0]))


@pytest.mark.parametrize("seed", SEEDS)
def test_vine_matches_loop_and_telescopes(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = random_lengths(gen, 10)
    ends = random_steps(gen, lengths)
    values = [torch.rand(len(e), generator=gen, dtype=F64) for e in ends]
    outcome = torch.randint(0, 2, (len(lengths),), generator=gen).double()
    a = vine_advantages(values, ends, torch.tensor(lengths), outcome)
    close(a, ref_vine(values, ends, lengths, outcome))
    # sum over a response's steps of A_k (one token each) = R_i - V(s_0)
    per = split(a, lengths)
    for toks, e, v, r in zip(per, ends, values, outcome):
        if not toks:
            continue
        step_adv = [toks[int(end) - 1] for end in e]
        assert sum(step_adv) == pytest.approx(float(r - v[0]), abs=1e-5)


# ----------------------------------------------------------------------------- merge_steps


def test_merge_steps():
    ends = torch.arange(1, 11) * 3  # 10 steps
    # groups of 3, 3, 2, 2 original steps: keep indices 2, 5, 7, 9
    assert merge_steps(ends, 4).tolist() == ends[[2, 5, 7, 9]].tolist()
    assert merge_steps(ends, 10) is ends and merge_steps(ends, 20) is ends
    assert merge_steps(ends, 1).tolist() == [30]
    assert merge_steps(ends, 5).tolist() == ends[[1, 3, 5, 7, 9]].tolist()
    assert merge_steps(ends, 3).tolist() == ends[[3, 6, 9]].tolist()  # 4, 3, 3
    assert merge_steps(torch.zeros(0, dtype=torch.long), 2).numel() == 0
    for k in range(1, 15):
        for m in range(1, k):
            kept = merge_steps(torch.arange(1, k + 1), m).tolist()
            sizes = [b - a for a, b in zip([0] + kept, kept)]
            assert len(kept) == m and kept[-1] == k and max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        merge_steps(ends, 0)
