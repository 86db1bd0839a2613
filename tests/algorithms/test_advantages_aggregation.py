"""Advantage estimators and loss aggregations against hand-computed numbers
(docs/algorithms.md section 1, "Advantages" and "Aggregation of l_{i,t}")."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms.advantages import ADVANTAGES, dr_grpo, grpo, hapo_token_level, rloo
from rlpost.algorithms.aggregation import (
    AGGREGATIONS,
    balanced,
    constant_normaliser,
    seq_mean_token_mean,
    seq_mean_token_sum,
    side_weights,
    token_mean,
)
from rlpost.data.batch import Sample, view

EPS = 1e-6
F64 = torch.float64


# ----------------------------------------------------------------------------- advantages

R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]], dtype=F64)


def test_grpo_numbers_and_equivalence():
    a = grpo(R, EPS)
    # row 0: mean 0.5, sample std sqrt((4 * 0.25) / 3) = sqrt(1/3) -> +-0.5 / (sqrt(1/3) + eps) = +-0.866
    s0 = math.sqrt(1 / 3) + EPS
    # row 1: mean 0.75, sample std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5 -> 0.25/0.5, -0.75/0.5
    s1 = 0.5 + EPS
    expected = torch.tensor(
        [[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [0.25 / s1, 0.25 / s1, 0.25 / s1, -0.75 / s1]], dtype=F64
    )
    torch.testing.assert_close(a, expected)
    assert a[1].tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5], abs=1e-5)
    assert grpo(torch.tensor([[3.0], [1.0]]), EPS).abs().max() == 0  # group of one
    assert grpo(torch.ones(1, 4), EPS).abs().max() == 0  # all equal: no signal


def test_dr_grpo_numbers():
    # r - mean: row 0 mean 0.5, row 1 mean 0.75
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]], dtype=F64)
    torch.testing.assert_close(dr_grpo(R), expected)


def test_rloo_numbers():
    # row 0: r_0 = 1, others (0, 0, 1) mean 1/3 -> 2/3; r_1 = 0, others (1, 0, 1) mean 2/3 -> -2/3
    # row 1: r_0 = 1, others (1, 1, 0) mean 2/3 -> 1/3; r_3 = 0, others (1, 1, 1) mean 1 -> -1
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1 / 3, 1 / 3, 1 / 3, -1.0]], dtype=F64)
    torch.testing.assert_close(rloo(R), expected)
    assert rloo(torch.tensor([[5.0]])).item() == 0.0  # group of one


@pytest.mark.parametrize("g", [2, 3, 5, 8])
def test_rloo_is_g_over_g_minus_1_times_dr_grpo(g):
    # r_i - (sum - r_i)/(G-1) = (G r_i - sum)/(G-1) = G/(G-1) (r_i - mean)
    r = torch.rand(6, g, generator=torch.Generator().manual_seed(g), dtype=F64)
    torch.testing.assert_close(rloo(r), g / (g - 1) * dr_grpo(r))


def _token_level(r, lengths):
    """The HAPO formula in plain Python, no fallback: for showing |A| in a test."""
    total = sum(lengths)
    mu = sum(n * x for n, x in zip(lengths, r)) / total
    sigma = math.sqrt(sum(n * (x - mu) ** 2 for n, x in zip(lengths, r)) / total)
    return [(x - mu) / (sigma + 1e-6) for x in r]


def test_hapo_token_level_numbers():
    rewards = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=F64
    )
    lengths = torch.tensor([[1, 1, 1, 3], [2, 2, 4, 4], [1, 10, 10, 10], [3, 1, 4, 1]])
    a = hapo_token_level(rewards, lengths, eps=EPS)
    # row 0: sum|o| = 6, mu = 1/6, sigma^2 = (1 * (5/6)^2 + 5 * (1/6)^2) / 6 = (30/36)/6 = 5/36,
    #        sigma = sqrt(5)/6; A = (5/6)/(sigma+1e-6) ~ sqrt(5) = 2.236, -(1/6)/(sigma+1e-6) ~ -0.447
    s0 = math.sqrt(5) / 6 + 1e-6
    # row 1: sum|o| = 12, mu = 4/12 = 1/3, sigma^2 = (4 * (2/3)^2 + 8 * (1/3)^2) / 12 = (24/9)/12 = 2/9,
    #        sigma = sqrt(2)/3; A = (2/3)/sigma ~ sqrt(2), -(1/3)/sigma ~ -1/sqrt(2)
    s1 = math.sqrt(2) / 3 + 1e-6
    # row 2: sum|o| = 31, mu = 1/31, sigma^2 = (1 * (30/31)^2 + 30 * (1/31)^2) / 31 = 30/961,
    #        sigma = sqrt(30)/31, A_0 = (30/31)/sigma = sqrt(30) = 5.477 >= 5 -> GRPO fallback:
    #        mean 0.25, sample std sqrt((0.5625 + 3 * 0.0625)/3) = 0.5 -> 0.75/0.5, -0.25/0.5
    s2 = 0.5 + EPS
    # row 3: all rewards equal -> 0
    expected = torch.tensor(
        [
            [(5 / 6) / s0, -(1 / 6) / s0, -(1 / 6) / s0, -(1 / 6) / s0],
            [(2 / 3) / s1, (2 / 3) / s1, -(1 / 3) / s1, -(1 / 3) / s1],
            [0.75 / s2, -0.25 / s2, -0.25 / s2, -0.25 / s2],
            [0.0, 0.0, 0.0, 0.0],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(a, expected)
    assert a[0].tolist() == pytest.approx([math.sqrt(5)] + [-1 / math.sqrt(5)] * 3, abs=1e-4)
    assert a[1].tolist() == pytest.approx([math.sqrt(2)] * 2 + [-1 / math.sqrt(2)] * 2, abs=1e-4)


def test_hapo_fallback_group():
    # the group: rewards (1, 0, 0, 0), lengths (1, 10, 10, 10): one short correct answer
    r, n = [1.0, 0.0, 0.0, 0.0], [1, 10, 10, 10]
    token_level = _token_level(r, n)
    # A_0 = (30/31) / (sqrt(30)/31 + 1e-6) ~ sqrt(30) = 5.477 >= 5: the fallback must fire
    assert token_level[0] == pytest.approx(math.sqrt(30), abs=1e-4)
    assert abs(token_level[0]) >= 5
    rewards = torch.tensor([r], dtype=F64)
    lengths = torch.tensor([n])
    a = hapo_token_level(rewards, lengths, eps=EPS)
    torch.testing.assert_close(a, grpo(rewards, EPS))
    assert a[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    # with the threshold raised above sqrt(30), the token-level values stay
    a6 = hapo_token_level(rewards, lengths, eps_fallback_threshold=6.0, eps=EPS)
    torch.testing.assert_close(a6, torch.tensor([token_level], dtype=F64))
    assert a6[0, 1].item() == pytest.approx(-1 / math.sqrt(30), abs=1e-5)


def test_hapo_fallback_is_per_group_and_edge_cases():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=F64)
    lengths = torch.tensor([[1, 10, 10, 10], [1, 1, 1, 3]])
    a = hapo_token_level(rewards, lengths, eps=EPS)
    torch.testing.assert_close(a[0], grpo(rewards, EPS)[0])  # fell back
    assert a[1, 0].item() == pytest.approx(math.sqrt(5), abs=1e-4)  # row 0 of the numbers test
    # a group without response tokens carries nothing
    assert hapo_token_level(torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 0]])).abs().max() == 0
    # zero variance exactly 0, also with rewards that are not exact in binary
    z = hapo_token_level(torch.full((1, 3), 0.1), torch.tensor([[3, 7, 11]]))
    assert z.abs().max() == 0


def test_advantages_registry_uniform_signature():
    lengths = torch.tensor([[1, 1, 1, 3], [2, 2, 4, 4]])
    assert set(ADVANTAGES) == {"grpo", "dr_grpo", "rloo", "hapo"}
    torch.testing.assert_close(ADVANTAGES["grpo"](R, lengths, 0.1), grpo(R, 0.1))
    torch.testing.assert_close(ADVANTAGES["dr_grpo"](R, lengths, 0.1), dr_grpo(R))
    torch.testing.assert_close(ADVANTAGES["rloo"](R, lengths, 0.1), rloo(R))
    torch.testing.assert_close(ADVANTAGES["hapo"](R, lengths, 0.1), hapo_token_level(R, lengths, eps=0.1))


# ----------------------------------------------------------------------------- aggregation


def _view(spec):
    """spec: (group, length, advantage) per sequence, in mini-batch order."""
    return view(
        [
            Sample(prompt_ids=[1], response_ids=[3] * n, group=g, advantages=torch.full((n,), a))
            for g, n, a in spec
        ]
    )


def _per_token(values_lengths):
    return torch.tensor([v for v, n in values_lengths for _ in range(n)], dtype=F64)


def test_seq_mean_token_sum_and_constant_numbers():
    b = _view([(0, 1, 1.0), (0, 3, -1.0), (1, 4, 0.5)])
    # mean over 3 sequences of sum_t l: 1/3 on every token; weights sum to 8/3 = mean length
    torch.testing.assert_close(seq_mean_token_sum(b), torch.full((8,), 1 / 3, dtype=F64))
    assert seq_mean_token_sum(b).sum().item() == pytest.approx(8 / 3)
    # sum l / C with C = 16 (e.g. max length 4 * 4 sequences in the config), whatever the batch
    torch.testing.assert_close(constant_normaliser(b, 16.0), torch.full((8,), 1 / 16, dtype=F64))
    torch.testing.assert_close(AGGREGATIONS["constant"](b, 16.0), torch.full((8,), 1 / 16, dtype=F64))
    with pytest.raises(ValueError, match="constant"):
        AGGREGATIONS["constant"](b, None)
    with pytest.raises(ValueError, match="C > 0"):
        constant_normaliser(b, 0.0)


def test_registry_entries_take_b_and_constant():
    b = _view([(0, 1, 1.0), (0, 3, -1.0), (1, 4, 0.5)])
    assert set(AGGREGATIONS) == {
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "constant",
        "balanced",
    }
    for fn in AGGREGATIONS.values():
        w = fn(b, 10.0)  # all accept the constant; only "constant" reads it
        assert w.dtype == F64 and w.shape == (8,)
    torch.testing.assert_close(AGGREGATIONS["token-mean"](b, None), token_mean(b))
    torch.testing.assert_close(AGGREGATIONS["seq-mean-token-mean"](b, 3.0), seq_mean_token_mean(b))
    torch.testing.assert_close(AGGREGATIONS["balanced"](b, None), balanced(b))


# groups 7 and 2, interleaved in the mini-batch:
#   group 7: lengths 2 (+), 4 (+), 5 (-), 3 (0)  -> G = 4, k = 2, n- = 1, N+ = 6, N- = 5
#   group 2: lengths 1 (+), 3 (-)                -> G = 2, k = 1, n- = 1, N+ = 1, N- = 3
BA_SPEC = [(7, 2, 1.0), (2, 1, 0.3), (7, 4, 0.5), (7, 5, -1.0), (2, 3, -0.7), (7, 3, 0.0)]


def test_balanced_numbers():
    b = _view(BA_SPEC)
    w = balanced(b)
    # group 7: S+ tokens (k/G)/N+ = (2/4)/6 = 1/12, S- tokens (1/4)/5 = 1/20, zero-advantage 0
    # group 2: S+ tokens (1/2)/1 = 1/2, S- tokens (1/2)/3 = 1/6
    # two groups in the mini-batch: everything / 2
    expected = _per_token([(1 / 24, 2), (1 / 4, 1), (1 / 24, 4), (1 / 40, 5), (1 / 12, 3), (0.0, 3)])
    torch.testing.assert_close(w, expected)
    # sum: group 7 (6/12 + 5/20) = 3/4 = (k + n-)/G, group 2: 1/2 + 1/2 = 1; mean (3/4 + 1)/2 = 7/8
    assert w.sum().item() == pytest.approx(7 / 8)


def test_balanced_side_weights_are_response_shares_per_group():
    b = _view(BA_SPEC)
    w = balanced(b)
    # batch level: positive (2/4 + 1/2)/2 = 1/2, negative (1/4 + 1/2)/2 = 3/8
    assert side_weights(b, w) == pytest.approx((1 / 2, 3 / 8))
    n_groups = 2
    for g, k_over_g, n_over_g in [(7, 2 / 4, 1 / 4), (2, 1 / 2, 1 / 2)]:
        in_group = (b.group_index == g)[b.seq_index]
        pos, neg = side_weights(b, torch.where(in_group, w, 0.0))
        assert (pos * n_groups, neg * n_groups) == pytest.approx((k_over_g, n_over_g))


def test_token_mean_side_weights_are_token_shares():
    b = _view(BA_SPEC)
    # 18 tokens: N+ = 2 + 1 + 4 = 7, N- = 5 + 3 = 8, 3 zero-advantage tokens
    assert side_weights(b, token_mean(b)) == pytest.approx((7 / 18, 8 / 18))
    # sign-length coupling: two short correct (2 tokens), two long wrong (8 tokens) answers
    c = _view([(0, 2, 1.0), (0, 2, 1.0), (0, 8, -1.0), (0, 8, -1.0)])
    assert side_weights(c, token_mean(c)) == pytest.approx((4 / 20, 16 / 20))  # N+/N, N-/N
    assert side_weights(c, balanced(c)) == pytest.approx((2 / 4, 2 / 4))  # k/G, n-/G
    # BA keeps tokens within a side equal: 1/4 side over 4 positive tokens, over 16 negative
    torch.testing.assert_close(balanced(c), _per_token([(1 / 8, 4), (1 / 32, 16)]))


def test_balanced_zero_length_and_zero_advantage_group():
    # group 0: lengths 0 (+), 2 (+), 2 (-): G = 3 (the empty response stays in G but is on no
    #          side), k = 1, n- = 1, N+ = N- = 2 -> (1/3)/2 = 1/6 per token
    # group 1: all advantages 0 -> weight 0, but it counts as a group: 1/6 / 2 = 1/12
    b = _view([(0, 0, 1.0), (0, 2, 1.0), (0, 2, -1.0), (1, 3, 0.0), (1, 1, 0.0)])
    torch.testing.assert_close(balanced(b), _per_token([(1 / 12, 4), (0.0, 4)]))
    empty = _view([(0, 0, 1.0)])
    assert balanced(empty).shape == (0,)


def test_balanced_equals_seq_mean_token_mean_exactly_when():
    # Per token of o_i in S+ of group g, BA weight = (k/G)/N+ / n_groups; seq-mean-token-mean
    # weight = 1/(|o_i| S). If all S+ responses of g have one length L+ then N+ = k L+ and the BA
    # weight is 1/(G L+ n_groups); likewise on S-. With every group of size G, S = G n_groups and
    # the two coincide. So the equality holds when: no zero advantage, every group has the same
    # size G, and within each group the positive responses share one length and the negative ones
    # share one length (the two lengths, and lengths across groups, may differ). The case in the
    # brief, all |o_i| = L: BA L_g = (k/G) sum_{S+} l/(kL) + (n/G) sum_{S-} l/(nL) = (1/(GL)) sum l.
    equal_all = [(g, 5, a) for g in range(3) for a in (1.0, -1.0, 2.0, -0.5)]
    b = _view(equal_all)
    torch.testing.assert_close(balanced(b), seq_mean_token_mean(b))
    sides = [
        (0, 2, 1.0),
        (0, 2, 0.4),
        (0, 5, -1.0),
        (0, 5, -2.0),
        (1, 3, 1.0),
        (1, 7, -1.0),
        (1, 7, -0.1),
        (1, 7, -0.3),
        (2, 1, 1.0),
        (2, 1, 1.0),
        (2, 1, 0.2),
        (2, 4, -3.0),
    ]
    b = _view(sides)
    torch.testing.assert_close(balanced(b), seq_mean_token_mean(b))
    # and not otherwise: lengths differing within a side ...
    b = _view([(0, 2, 1.0), (0, 3, 1.0), (0, 5, -1.0), (0, 5, -1.0)])
    assert not torch.allclose(balanced(b), seq_mean_token_mean(b))
    # ... groups of different sizes ...
    b = _view([(0, 2, 1.0), (0, 2, -1.0), (1, 2, 1.0), (1, 2, -1.0), (1, 2, 1.0)])
    assert not torch.allclose(balanced(b), seq_mean_token_mean(b))
    # ... a zero advantage
    b = _view([(0, 2, 1.0), (0, 2, -1.0), (0, 2, 0.0)])
    assert not torch.allclose(balanced(b), seq_mean_token_mean(b))


def test_weight_sums():
    gen = torch.Generator().manual_seed(0)
    spec = []
    for g in range(5):
        for _ in range(int(torch.randint(2, 6, (), generator=gen))):
            n = int(torch.randint(1, 12, (), generator=gen))
            a = float(torch.randint(-1, 2, (), generator=gen))  # -1, 0 or +1
            spec.append((g, n, a))
    b = _view(spec)
    n_tokens, n_seq = sum(n for _, n, _ in spec), len(spec)
    assert token_mean(b).sum().item() == pytest.approx(1.0)
    assert seq_mean_token_mean(b).sum().item() == pytest.approx(1.0)
    assert seq_mean_token_sum(b).sum().item() == pytest.approx(n_tokens / n_seq)  # mean length
    assert constant_normaliser(b, 100.0).sum().item() == pytest.approx(n_tokens / 100.0)
    # BA: mean over groups of the fraction of non-zero-advantage responses
    fractions = []
    for g in range(5):
        advs = [a for gg, _, a in spec if gg == g]
        fractions.append(sum(a != 0 for a in advs) / len(advs))
    assert balanced(b).sum().item() == pytest.approx(sum(fractions) / len(fractions))
    assert 0 < sum(fractions) / len(fractions) < 1  # the draw has zero advantages in it


def test_every_configurable_advantage_is_registered():
    from typing import get_args

    from rlpost.algorithms.advantages import AdvantageName

    assert set(get_args(AdvantageName)) == set(ADVANTAGES)
