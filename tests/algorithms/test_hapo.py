"""HAPO's pieces against hand-computed numbers (docs/algorithms.md section 1, "HAPO")."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import TokenTensors, build_algorithm
from rlpost.algorithms.hapo import (
    EntropyStats,
    adaptive_clip_bounds,
    adaptive_temperature,
    entropy_stats,
    hapo_token_loss,
    normalised_log_entropy,
    quantile_linear,
    redistribute_advantages,
)

# Entropies whose logs are e = [1, -2, 2, 0, -1] (shuffled so the extremes are not at
# the ends), plus two padding tokens masked out: a huge entropy and a zero entropy.
E_VALID = [1.0, -2.0, 2.0, 0.0, -1.0]
H = torch.tensor([math.exp(x) for x in E_VALID] + [1e6, 0.0])
MASK = torch.tensor([True] * 5 + [False, False])
# 0.8-quantile with torch.quantile's default linear interpolation: sorted e =
# [-2, -1, 0, 1, 2], rank 0.8 * (5 - 1) = 3.2 -> 1 + 0.2 * (2 - 1) = 1.2.
P = 1.2
# e - p = [-0.2, -3.2, 0.8, -1.2, -2.2]; squares 0.04 + 10.24 + 0.64 + 1.44 + 4.84 = 17.2;
# mean 3.44 -> s = sqrt(3.44) = 1.854724...
S = math.sqrt(3.44)
# h = (e - p) / s; max_pos = 0.8 / s (only token 2 is positive), min_neg = -3.2 / s.
# h_hat: positive side 0.8 / 0.8 = 1; negative side -h / min_neg = -(d / s) / (-3.2 / s) = d / 3.2
# with d = e - p: -0.2 / 3.2 = -0.0625, -1, -1.2 / 3.2 = -0.375, -2.2 / 3.2 = -0.6875.
H_HAT = [-0.0625, -1.0, 1.0, -0.375, -0.6875]


def test_entropy_stats_numbers():
    st = entropy_stats(H, MASK, q=0.8)
    assert st.p == pytest.approx(P, abs=1e-5)
    assert st.s == pytest.approx(S, abs=1e-5)
    assert S == pytest.approx(1.854724, abs=1e-6)
    assert st.max_pos == pytest.approx(0.8 / S, abs=1e-5)  # 0.431331
    assert st.min_neg == pytest.approx(-3.2 / S, abs=1e-5)  # -1.725326
    # the pivot is torch.quantile's default (linear) quantile of the valid log-entropies
    e = H[:5].log()
    assert st.p == pytest.approx(torch.quantile(e, 0.8).item(), abs=1e-6)
    # a float 0/1 mask works like a boolean one; no mask means every token is valid
    assert entropy_stats(H, MASK.float()) == st
    assert entropy_stats(H[:5]) == st


def test_normalised_log_entropy_numbers_and_exact_extremes():
    st = entropy_stats(H, MASK)
    h_hat = normalised_log_entropy(H, st)
    torch.testing.assert_close(h_hat[:5], torch.tensor(H_HAT), atol=1e-5, rtol=0)
    # exactly -1 at the lowest-entropy valid token (index 1) and +1 at the highest (index 2)
    assert h_hat[1].item() == -1.0
    assert h_hat[2].item() == 1.0
    assert h_hat[:5].min().item() == -1.0 and h_hat[:5].max().item() == 1.0
    # masked padding: the huge entropy would give h_hat >> 1 and the zero entropy
    # (floored at 1e-8, e = -18.42) h_hat << -1; both are clamped to the range
    assert h_hat[5].item() == 1.0
    assert h_hat[6].item() == -1.0


def test_normalised_log_entropy_with_stats_of_another_batch_is_clamped():
    st = entropy_stats(H, MASK)
    # new batch: e = 1.6 -> h_hat = (1.6 - 1.2) / 0.8 = 0.5; e = 5 -> (5 - 1.2) / 0.8 = 4.75 -> 1;
    # e = -0.4 -> (-0.4 - 1.2) / 3.2 = -0.5; e = -10 -> -11.2 / 3.2 = -3.5 -> -1
    other = torch.tensor([1.6, 5.0, -0.4, -10.0]).exp()
    torch.testing.assert_close(
        normalised_log_entropy(other, st), torch.tensor([0.5, 1.0, -0.5, -1.0]), atol=1e-5, rtol=0
    )


def test_normalised_log_entropy_has_no_gradient():
    ent = H[:5].clone().requires_grad_(True)
    h_hat = normalised_log_entropy(ent, entropy_stats(ent))
    assert not h_hat.requires_grad


def test_entropy_stats_degenerate_cases():
    # all-equal entropies: s = 0, h := 0 everywhere, no positive side (max_pos = 1) and
    # min(h-) = 0 (min_neg := -1); every h_hat is 0
    st = entropy_stats(torch.full((4,), 0.7))
    assert st == EntropyStats(p=pytest.approx(math.log(0.7)), s=0.0, max_pos=1.0, min_neg=-1.0)
    assert normalised_log_entropy(torch.tensor([0.7, 5.0, 1e-3]), st).abs().max().item() == 0.0
    # zero entropies are floored at 1e-8 before the log: still all equal
    st0 = entropy_stats(torch.zeros(3))
    assert st0.s == 0.0 and st0.p == pytest.approx(math.log(1e-8))
    # no valid token: neutral statistics, h_hat = 0
    assert entropy_stats(H, torch.zeros(7, dtype=torch.bool)) == EntropyStats.neutral()
    assert entropy_stats(torch.zeros(0)) == EntropyStats.neutral()
    # q = 1: p = max e = 2, no h > 0 -> max_pos = 1; d = e - p = [-1, -4, 0, -2, -3],
    # h_hat = d / 4 = [-0.25, -1, 0, -0.5, -0.75]
    st1 = entropy_stats(H, MASK, q=1.0)
    assert st1.p == pytest.approx(2.0, abs=1e-5) and st1.max_pos == 1.0
    torch.testing.assert_close(
        normalised_log_entropy(H[:5], st1), torch.tensor([-0.25, -1.0, 0.0, -0.5, -0.75]), atol=1e-5, rtol=0
    )
    # q = 0: p = min e = -2, min(h-) = 0 -> min_neg = -1; d = [3, 0, 4, 2, 1], h_hat = d / 4
    st2 = entropy_stats(H, MASK, q=0.0)
    assert st2.min_neg == -1.0
    torch.testing.assert_close(
        normalised_log_entropy(H[:5], st2), torch.tensor([0.75, 0.0, 1.0, 0.5, 0.25]), atol=1e-5, rtol=0
    )


def test_quantile_linear_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 17, 1000):
        x = torch.randn(n, generator=g)
        for q in (0.0, 0.13, 0.5, 0.8, 1.0):
            torch.testing.assert_close(quantile_linear(x, q), torch.quantile(x, q))


def test_adaptive_temperature_numbers():
    h_hat = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    # T (1 + 0.05 h): 1 - 0.05, 1 - 0.025, 1, 1 + 0.025, 1 + 0.05
    torch.testing.assert_close(
        adaptive_temperature(1.0, h_hat), torch.tensor([0.95, 0.975, 1.0, 1.025, 1.05])
    )
    # T = 0.7: 0.7 * 0.95 = 0.665, 0.7 * 1.05 = 0.735
    torch.testing.assert_close(
        adaptive_temperature(0.7, h_hat, tau=0.05), torch.tensor([0.665, 0.6825, 0.7, 0.7175, 0.735])
    )
    # tau = 0 switches it off
    torch.testing.assert_close(adaptive_temperature(0.7, h_hat, tau=0.0), torch.full((5,), 0.7))


def test_adaptive_clip_bounds_numbers():
    h_hat = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    lo, hi = adaptive_clip_bounds(h_hat, 0.2, 0.2, alpha=1.0)
    # eps_low_t = 0.2 (1 - h) for h <= 0: 0.4, 0.3, 0.2; 0.2 for h > 0
    torch.testing.assert_close(lo, torch.tensor([0.4, 0.3, 0.2, 0.2, 0.2]))
    # eps_high_t = 0.2 (1 + h) for h > 0: 0.3, 0.4; 0.2 for h <= 0
    torch.testing.assert_close(hi, torch.tensor([0.2, 0.2, 0.2, 0.3, 0.4]))
    # asymmetric base and alpha = 0.5: low 0.2 * (1 + 0.5) = 0.3, 0.2 * 1.25 = 0.25;
    # high 0.28 * 1.25 = 0.35, 0.28 * 1.5 = 0.42
    lo, hi = adaptive_clip_bounds(h_hat, 0.2, 0.28, alpha=0.5)
    torch.testing.assert_close(lo, torch.tensor([0.3, 0.25, 0.2, 0.2, 0.2]))
    torch.testing.assert_close(hi, torch.tensor([0.28, 0.28, 0.28, 0.35, 0.42]))
    # alpha = 0 gives the base bounds everywhere
    lo, hi = adaptive_clip_bounds(h_hat, 0.2, 0.28, alpha=0.0)
    torch.testing.assert_close(lo, torch.full((5,), 0.2))
    torch.testing.assert_close(hi, torch.full((5,), 0.28))


def test_redistribution_four_cases():
    h_hat = torch.tensor([0.5, 0.5, -0.5, -0.5])
    lo, hi = adaptive_clip_bounds(h_hat, 0.2, 0.2, alpha=1.0)
    # h = 0.5: eps_low_t 0.2, eps_high_t 0.3 -> N = (1 - 0.1, 1 + 0.15) = (0.9, 1.15)
    # h = -0.5: eps_low_t 0.3, eps_high_t 0.2 -> N = (1 - 0.15, 1 + 0.1) = (0.85, 1.1)
    ratio = torch.tensor([1.0, 1.2, 0.9, 0.8])
    adv = torch.tensor([2.0, 2.0, -2.0, -2.0])
    out = redistribute_advantages(adv, ratio, h_hat, lo, hi, beta=1.0)
    # high entropy, inside (1.0 in (0.9, 1.15)): A = 2
    # high entropy, outside (1.2 >= 1.15): A~ = 2 * (1 + 0.5) = 3
    # low entropy, inside (0.9 in (0.85, 1.1)): A~ = -2 * (1 - 0.5) = -1
    # low entropy, outside (0.8 <= 0.85): A = -2
    torch.testing.assert_close(out, torch.tensor([2.0, 3.0, -1.0, -2.0]))
    # beta = 0.5: A~ = A (1 + 0.5 h) -> 2 * 1.25 = 2.5 and -2 * 0.75 = -1.5
    out = redistribute_advantages(adv, ratio, h_hat, lo, hi, beta=0.5)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.5, -1.5, -2.0]))
    # beta = 0 switches it off
    torch.testing.assert_close(redistribute_advantages(adv, ratio, h_hat, lo, hi, beta=0.0), adv)


def test_redistribution_zone_bounds_are_strict_and_no_grad():
    # exactly representable: h = 0.5, eps 0.25 -> eps_high_t = 0.375, N = (0.875, 1.1875)
    h_hat = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    lo, hi = adaptive_clip_bounds(h_hat, 0.25, 0.25)
    ratio = torch.tensor([0.875, 1.1875, 1.0], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    out = redistribute_advantages(adv, ratio, h_hat, lo, hi)
    # on either bound the token is outside N (high entropy -> A~ = 1.5); strictly inside -> A
    torch.testing.assert_close(out, torch.tensor([1.5, 1.5, 1.0]))
    assert not out.requires_grad


def _grpo_loss(logp, old, adv, **cfg):
    algo = build_algorithm("grpo", cfg)
    t = TokenTensors(
        logp=logp,
        old_logp=old,
        advantages=adv,
        entropy=torch.zeros_like(adv),
        ref_logp=None,
        seq_index=torch.zeros(adv.numel(), dtype=torch.long),
    )
    return algo.token_loss(t)


def test_equals_plain_ppo_clip_when_h_hat_is_zero():
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7, 20.0, 0.95])
    adv = torch.tensor([2.0, -1.0, 1.0, 3.0, -1.0, -0.5])
    old = torch.zeros(6)
    h0 = torch.zeros(6)
    for eps_low, eps_high in ((0.2, 0.2), (0.2, 0.28)):
        logp_ref = ratio.log().requires_grad_(True)
        ref, ref_m = _grpo_loss(
            logp_ref, old, adv, clip_eps_low=eps_low, clip_eps_high=eps_high, dual_clip=10.0
        )
        ref.sum().backward()
        for redistribute in (False, True):  # with h_hat = 0, A~ = A, so redistribution is a no-op too
            logp = ratio.log().requires_grad_(True)
            loss, m = hapo_token_loss(
                logp,
                old,
                adv,
                h0,
                eps_low=eps_low,
                eps_high=eps_high,
                dual_clip=10.0,
                redistribute=redistribute,
            )
            loss.sum().backward()
            torch.testing.assert_close(loss, ref)
            torch.testing.assert_close(logp.grad, logp_ref.grad)
            for k in ("clip_frac_low", "clip_frac_high", "ratio_min", "ratio_max", "approx_kl"):
                torch.testing.assert_close(m[k], ref_m[k])
    # and the numbers themselves (eps 0.2 / 0.28, c = 10): -2 * 1.28; 1 * 0.8; -1.1; -3 * 0.7;
    # rho = 20, A = -1: max(20, 1.2) = 20 capped at 10; rho = 0.95, A = -0.5: 0.475
    torch.testing.assert_close(loss.detach(), torch.tensor([-2.56, 0.8, -1.1, -2.1, 10.0, 0.475]))


def test_hapo_token_loss_numbers():
    # rho, A, h_hat per token (eps 0.2 / 0.2, alpha = beta = 1, c = 10):
    # 0: h = 1, A = 1, rho = 1.5: eps_high_t = 0.4, N = (0.9, 1.2) -> outside -> A~ = 2;
    #    clip(1.5, 0.8, 1.4) = 1.4 -> max(-3, -2.8) = -2.8, high clip fires
    # 1: h = -1, A = 1, rho = 1.05: eps_low_t = 0.4, N = (0.8, 1.1) -> inside -> A~ = 0 -> loss 0
    # 2: h = -1, A = -1, rho = 0.7: lower bound 1 - 0.4 = 0.6, outside N (0.7 <= 0.8) -> A = -1;
    #    clip(0.7, 0.6, 1.2) = 0.7 -> loss 0.7, not clipped (the base clip would give 0.8)
    # 3: h = 0, A = -1, rho = 20: N = (0.9, 1.1) -> outside, A~ = A; max(20, 1.2) = 20 -> dual clip 10
    # 4: h = 0.5, A = -2, rho = 0.5: eps_high_t = 0.3, N = (0.9, 1.15) -> outside -> A~ = -3;
    #    clip(0.5, 0.8, 1.3) = 0.8 -> max(1.5, 2.4) = 2.4, low clip fires
    ratio = torch.tensor([1.5, 1.05, 0.7, 20.0, 0.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -2.0])
    h_hat = torch.tensor([1.0, -1.0, -1.0, 0.0, 0.5])
    logp = ratio.log().requires_grad_(True)
    loss, m = hapo_token_loss(logp, torch.zeros(5), adv, h_hat)
    torch.testing.assert_close(loss.detach(), torch.tensor([-2.8, 0.0, 0.7, 10.0, 2.4]))
    torch.testing.assert_close(m["clip_frac_high"], torch.tensor([1.0, 0, 0, 0, 0]))
    torch.testing.assert_close(m["clip_frac_low"], torch.tensor([0, 0, 0, 0, 1.0]))
    torch.testing.assert_close(m["neutral_frac"], torch.tensor([0, 1.0, 0, 0, 0]))
    torch.testing.assert_close(m["h_hat"], h_hat)
    # gradient d loss / d logp = -A~ rho where unclipped (token 2: 1 * 0.7), 0 where clipped,
    # capped or A~ = 0
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, 0.7, 0.0, 0.0]))

    # ablations: adaptive clip only (no redistribution): token 0 -> -1.4, token 1 -> -1.05,
    # token 4 -> A = -2: max(1.0, 1.6) = 1.6
    loss, _ = hapo_token_loss(ratio.log(), torch.zeros(5), adv, h_hat, redistribute=False)
    torch.testing.assert_close(loss, torch.tensor([-1.4, -1.05, 0.7, 10.0, 1.6]))
    # redistribution only (base bounds 0.8 / 1.2, N = (0.9, 1.1) everywhere):
    # token 0: outside -> A~ = 2, clip 1.2 -> -2.4; token 1: inside -> A~ = 0 -> 0;
    # token 2: outside -> A = -1, clip 0.8 -> 0.8; token 4: outside -> A~ = -3, clip 0.8 -> 2.4
    loss, _ = hapo_token_loss(ratio.log(), torch.zeros(5), adv, h_hat, adaptive_clip=False)
    torch.testing.assert_close(loss, torch.tensor([-2.4, 0.0, 0.8, 10.0, 2.4]))
    # dual clip off: token 3 -> 20
    loss, _ = hapo_token_loss(ratio.log(), torch.zeros(5), adv, h_hat, dual_clip=None)
    assert loss[3].item() == pytest.approx(20.0, rel=1e-5)


def test_ratio_one_nothing_clipped_loss_is_minus_advantage():
    # clip-higher style check: rho == 1 is inside every clip range, so nothing is clipped
    adv = torch.tensor([1.0, -2.0, 0.5, -0.5, 3.0])
    h_hat = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    logp = torch.tensor([-0.3, -1.0, -2.0, -0.1, -5.0])
    loss, m = hapo_token_loss(logp, logp.clone(), adv, h_hat, redistribute=False)
    torch.testing.assert_close(loss, -adv)
    assert m["clip_frac_low"].sum().item() == 0 and m["clip_frac_high"].sum().item() == 0
    # rho == 1 is also inside every neutral zone, so with redistribution high-entropy tokens
    # keep -A and low-entropy ones get -A (1 + h): 1 * 0 = 0, -2 * 0.5 = -1 -> 1; 0.5 * 1
    loss, m = hapo_token_loss(logp, logp.clone(), adv, h_hat)
    torch.testing.assert_close(loss, torch.tensor([0.0, 1.0, -0.5, 0.5, -3.0]))
    torch.testing.assert_close(m["neutral_frac"], torch.ones(5))
    assert m["clip_frac_low"].sum().item() == 0 and m["clip_frac_high"].sum().item() == 0


def test_full_pipeline_from_entropies():
    # h_hat from the entropy batch above, then the loss at rho = 1 without redistribution is -A
    st = entropy_stats(H, MASK)
    h_hat = normalised_log_entropy(H[:5], st)
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5])
    loss, m = hapo_token_loss(torch.zeros(5), torch.zeros(5), adv, h_hat, redistribute=False)
    torch.testing.assert_close(loss, -adv)
    torch.testing.assert_close(m["h_hat"], torch.tensor(H_HAT), atol=1e-5, rtol=0)


# ---- the `hapo` algorithm module ----------------------------------------------------------


def test_hapo_algorithm_defaults_and_inputs():
    algo = build_algorithm("hapo", {})
    assert algo.cfg.advantage == "hapo" and algo.cfg.dual_clip == 10.0
    assert algo.cfg.entropy_quantile == 0.8 and algo.cfg.alpha == 1.0 and algo.cfg.beta == 1.0
    entropy = torch.tensor([0.1, 1.0, 2.0, 0.5, 3.0])
    h_hat = algo.token_inputs(entropy)["h_hat"]
    assert h_hat[0].item() == pytest.approx(-1.0) and h_hat[4].item() == pytest.approx(1.0)
    assert h_hat.argsort().tolist() == entropy.argsort().tolist()


def test_hapo_algorithm_loss_is_hapo_token_loss():
    algo = build_algorithm("hapo", {"alpha": 0.5, "beta": 0.5})
    logp = torch.tensor([-1.0, -0.5, -2.0, -0.1])
    old = torch.tensor([-1.3, -0.5, -1.2, -0.4])
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5])
    h_hat = torch.tensor([-1.0, 0.2, 1.0, -0.3])
    t = TokenTensors(
        logp=logp,
        old_logp=old,
        advantages=adv,
        entropy=torch.zeros(4),
        ref_logp=None,
        seq_index=torch.zeros(4, dtype=torch.long),
        extra={"h_hat": h_hat},
    )
    loss, metrics = algo.token_loss(t)
    expected, _ = hapo_token_loss(logp, old, adv, h_hat, 0.2, 0.2, 0.5, 0.5, 10.0)
    torch.testing.assert_close(loss, expected)
    assert {"h_hat", "neutral_frac", "clip_frac_low", "clip_frac_high"} <= set(metrics)
