"""Token and sample selection against hand-computed numbers and brute force
(docs/algorithms.md section 1, "Token and sample selection")."""

from __future__ import annotations

import itertools

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.selection import (
    d3s_token_mask,
    entropy_quantile_mask,
    linear_schedule,
    max_variance_subset,
    subset_size,
    top_fraction_mask,
)
from rlpost.errors import ConfigError


def _kept(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def _population_variance(values) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


# ----------------------------------------------------------------------------- D3S sample level


def test_max_variance_subset_numbers():
    adv = torch.tensor([[0.5, -1.0, 2.0, 0.0, -0.3]])
    # sorted: -1, -0.3, 0, 0.5, 2; N = 3, top j + bottom 3 - j:
    # j=0 {-1, -0.3, 0}: var 0.1756; j=1 {-1, -0.3, 2}: mean 0.2333, var 1.6422;
    # j=2 {-1, 0.5, 2}: var 1.5; j=3 {0, 0.5, 2}: var 0.7222 -> j = 1
    assert _population_variance([-1, -0.3, 2]) == pytest.approx(1.6422, abs=1e-4)
    assert _population_variance([-1, 0.5, 2]) == pytest.approx(1.5)
    assert _kept(max_variance_subset(adv, 3)[0]) == [1, 2, 4]
    # N = 2: the two extremes -1 and 2 (var 2.25)
    assert _kept(max_variance_subset(adv, 2)[0]) == [1, 2]
    # N >= G keeps everything
    assert max_variance_subset(adv, 5).all() and max_variance_subset(adv, 9).all()


def test_max_variance_subset_ties_are_deterministic():
    # binary rewards: advantages +1 at 0, 1, 5 and -1 at 2, 3, 4; N = 2 -> one of each (var 1).
    # Stable ascending sort: the bottom one is the first -1 (index 2), the top one the last +1
    # (index 5).
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0]])
    assert _kept(max_variance_subset(adv, 2)[0]) == [2, 5]
    # N = 4: two of each side (var 1, against 0.75 for 3 + 1): -1 at 2, 3 and +1 at 1, 5
    assert _kept(max_variance_subset(adv, 4)[0]) == [1, 2, 3, 5]
    # a group without signal: every subset has variance 0; the first j = 0 keeps the first N
    assert _kept(max_variance_subset(torch.zeros(1, 4), 2)[0]) == [0, 1]


@pytest.mark.parametrize("seed", range(6))
def test_max_variance_subset_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    group = 6
    # integer-valued draws make ties common, continuous ones make them rare
    adv = (
        torch.randint(-2, 3, (4, group), generator=g).double()
        if seed % 2
        else torch.randn(4, group, generator=g, dtype=torch.float64)
    )
    for n in range(1, group + 1):
        mask = max_variance_subset(adv, n)
        for row, m in zip(adv.tolist(), mask):
            assert int(m.sum()) == n
            best = max(
                _population_variance([row[i] for i in subset])
                for subset in itertools.combinations(range(group), n)
            )
            assert _population_variance([row[i] for i in _kept(m)]) == pytest.approx(best, abs=1e-12)


def test_subset_size_and_linear_schedule_numbers():
    # N = frac * G rounded half up, within [1, G]
    assert subset_size(0.5, 8) == 4
    assert subset_size(0.3, 8) == 2  # 2.4
    assert subset_size(0.32, 8) == 3  # 2.56
    assert subset_size(0.3125, 8) == 3  # 2.5 rounds up
    assert subset_size(0.01, 8) == 1
    assert subset_size(1.0, 8) == 8
    # start at step 1, end at step 1 + steps, constant after
    assert linear_schedule(0.5, 1.0, 10, 1) == 0.5
    assert linear_schedule(0.5, 1.0, 10, 6) == pytest.approx(0.75)
    assert linear_schedule(0.5, 1.0, 10, 11) == 1.0
    assert linear_schedule(0.5, 1.0, 10, 500) == 1.0
    assert linear_schedule(0.2, 0.6, 4, 2) == pytest.approx(0.3)


# ----------------------------------------------------------------------------- token level


def test_top_fraction_mask_numbers():
    score = torch.tensor([0.3, 0.9, 0.1, 0.9, 0.5])
    # k = 0.4 * 5 = 2: both 0.9s
    assert _kept(top_fraction_mask(score, 0.4)) == [1, 3]
    # k = 1: a tie at the threshold goes to the earlier token
    assert _kept(top_fraction_mask(score, 0.2)) == [1]
    # k = round(0.5 * 5 = 2.5) = 3
    assert _kept(top_fraction_mask(score, 0.5)) == [1, 3, 4]
    # over the 4 valid tokens (token 1 is not), k = 2: 0.9 (token 3) and 0.5 (token 4)
    valid = torch.tensor([True, False, True, True, True])
    assert _kept(top_fraction_mask(score, 0.5, valid)) == [3, 4]
    # at least one token while there is a valid one
    assert _kept(top_fraction_mask(score, 0.01)) == [1]
    assert not top_fraction_mask(score, 0.5, torch.zeros(5, dtype=torch.bool)).any()


def test_d3s_token_mask_ranks_by_abs_advantage_times_entropy():
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0])
    entropy = torch.tensor([0.5, 0.1, 2.0, 3.0, 0.2])
    # |A| H = 0.5, 0.2, 1.0, 0.0, 0.2: the top 2 are tokens 2 and 0, although token 3 has the
    # largest entropy and token 1 the largest |A|
    assert _kept(d3s_token_mask(adv, entropy, 0.4)) == [0, 2]
    # top 3: a tie at 0.2 between tokens 1 and 4 goes to token 1
    assert _kept(d3s_token_mask(adv, entropy, 0.6)) == [0, 1, 2]


def test_entropy_quantile_mask_numbers():
    h = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0])
    # rho = 0.2: the 0.8 quantile of 10 values is at rank 0.8 * 9 = 7.2 of the sorted values:
    # 0.8 + 0.2 * (0.9 - 0.8) = 0.82 -> keep 0.9 and 1.0
    assert _kept(entropy_quantile_mask(h, 0.2)) == [2, 9]
    torch.testing.assert_close(torch.quantile(h, 0.8), torch.tensor(0.82))
    # rho = 0.5: median 0.55 -> keep 0.6 .. 1.0
    assert _kept(entropy_quantile_mask(h, 0.5)) == [2, 4, 6, 8, 9]
    # without token 9 (H = 1.0): 9 valid values 0.1 .. 0.9, rho = 0.25 -> 0.75 quantile at rank
    # 6 = 0.7 exactly; H >= 0.7 keeps 0.7, 0.8, 0.9; the invalid token is never kept
    valid = torch.ones(10, dtype=torch.bool)
    valid[9] = False
    assert _kept(entropy_quantile_mask(h, 0.25, valid)) == [2, 4, 6]
    # rho = 1 keeps every valid token
    assert _kept(entropy_quantile_mask(h, 1.0, valid)) == list(range(9))


# ----------------------------------------------------------------------------- from the config


def test_grpo_d3s_follows_its_schedule():
    algo = build_algorithm(
        "grpo",
        {
            "selection": "d3s",
            "d3s": {
                "sample_frac_start": 0.5,
                "sample_frac_end": 1.0,
                "token_frac_start": 0.25,
                "token_frac_end": 0.75,
                "schedule_steps": 4,
            },
        },
    )
    adv = torch.tensor([[1.0, -1.0, 0.5, -0.2], [0.3, 0.3, -0.6, 0.0]])
    # step 1: N = 0.5 * 4 = 2 per group: the extremes
    assert _kept(algo.select_samples(adv, 1).flatten()) == [0, 1, 5, 6]
    # step 3: frac 0.75, N = 3; step 5 and later: frac 1, all
    assert algo.select_samples(adv, 3).sum().item() == 6
    assert algo.select_samples(adv, 5).all()
    tok_adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.5, 0.5, 0.5, 0.5])
    entropy = torch.tensor([0.1, 0.2, 0.3, 0.4, 1.0, 1.1, 0.05, 0.6])
    # |A| H = 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.025, 0.3; step 1: K = 0.25 -> 2 of 8 tokens
    assert _kept(algo.token_mask(entropy, tok_adv, None, 1)) == [4, 5]
    # step 3: K = 0.5 -> 4 tokens; the tie at 0.3 goes to token 2
    assert _kept(algo.token_mask(entropy, tok_adv, None, 3)) == [2, 3, 4, 5]
    # the truncated (invalid) tokens 4 and 5 are out; step 1 -> 2 of the 6 valid tokens:
    # 0.4 (token 3), then the tie at 0.3 between tokens 2 and 7 goes to token 2
    valid = torch.tensor([True, True, True, True, False, False, True, True])
    assert _kept(algo.token_mask(entropy, tok_adv, valid, 1)) == [2, 3]


def test_no_selection_passes_the_valid_tokens_through():
    algo = build_algorithm("grpo", {})
    adv = torch.tensor([[1.0, -1.0]])
    assert algo.select_samples(adv, 1) is None
    assert algo.token_mask(torch.ones(3), torch.ones(3), None, 1) is None
    valid = torch.tensor([True, False, True])
    assert algo.token_mask(torch.ones(3), torch.ones(3), valid, 1) is valid


def test_hapo_takes_the_same_selection_keys():
    algo = build_algorithm("hapo", {"selection": "entropy_mask", "entropy_mask_rho": 0.5})
    h = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0])
    assert _kept(algo.token_mask(h, torch.ones(10), None, 1)) == [2, 4, 6, 8, 9]
    assert algo.select_samples(torch.ones(1, 4), 1) is None


@pytest.mark.parametrize(
    "params, message",
    [
        ({"d3s": {"sample_frac_start": 0.3}}, "algorithm.d3s is set but algorithm.selection is 'none'"),
        ({"selection": "d3s", "entropy_mask_rho": 0.3}, "algorithm.entropy_mask_rho is set"),
        ({"selection": "d3s", "d3s": {"sample_frac_end": 1.5}}, "key 'algorithm.d3s.sample_frac_end'"),
        ({"selection": "d3s", "d3s": {"samples": 3}}, "unknown key 'algorithm.d3s.samples'"),
        ({"selection": "entropy_mask", "entropy_mask_rho": 0}, "key 'algorithm.entropy_mask_rho'"),
        ({"selection": "top-k"}, "key 'algorithm.selection'"),
    ],
)
def test_selection_config_errors_name_the_key(params, message):
    with pytest.raises(ConfigError, match=message):
        build_algorithm("grpo", params)
