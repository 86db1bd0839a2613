"""DPO, TDPO1/2, SparsePO and cDPO losses against the formulas of docs/algorithms.md section 2
written out with the math module on hand-made numbers; their properties; exactness of the
per-pair sums (and of the gradient) under any split of the tokens."""

from __future__ import annotations

import math
import operator
from functools import reduce

import pytest
import torch

from rlpost.algorithms.pairs import PairSums, loss_coefficients, pair_sums, surrogate
from rlpost.algorithms.preference import (
    PreferenceConfig,
    dpo_loss,
    preference_loss,
    preference_metrics,
    tdpo_loss,
)
from rlpost.algorithms.sparsepo import sparsepo_loss

# Two pairs, hand-made. Per token: (pair, chosen, logp, ref_logp, kl)
TOKENS = [
    (0, True, -1.0, -1.5, 0.20),
    (0, True, -2.0, -1.0, 0.05),
    (0, False, -0.5, -0.7, 0.30),
    (1, True, -0.3, -0.4, 0.10),
    (1, False, -1.2, -2.0, 0.40),
    (1, False, -0.1, -0.1, 0.00),
    (1, False, -3.0, -2.5, 0.25),
]
BETA, ALPHA = 0.1, 0.5


def tensors(requires_grad=False):
    cols = list(zip(*TOKENS))
    pair = torch.tensor(cols[0])
    chosen = torch.tensor(cols[1])
    logp = torch.tensor(cols[2], dtype=torch.float64, requires_grad=requires_grad)
    ref = torch.tensor(cols[3], dtype=torch.float64)
    kl = torch.tensor(cols[4], dtype=torch.float64, requires_grad=requires_grad)
    return pair, chosen, logp, ref, kl


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def by_hand(pair: int, side: bool, fn) -> float:
    return sum(fn(i, t) for i, t in enumerate(TOKENS) if t[0] == pair and t[1] == side)


def test_dpo_by_hand():
    pair, chosen, logp, ref, _ = tensors()
    got = dpo_loss(pair_sums(logp, ref, pair, chosen, 2), BETA)
    # pair 0: Delta_w = 0.5 - 1.0 = -0.5, Delta_l = 0.2; pair 1: Delta_w = 0.1, Delta_l = 0.8 + 0 - 0.5
    want = [neg_log_sigmoid(BETA * (-0.5 - 0.2)), neg_log_sigmoid(BETA * (0.1 - 0.3))]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_by_hand(variant):
    pair, chosen, logp, ref, kl = tensors()
    got = tdpo_loss(pair_sums(logp, ref, pair, chosen, 2, kl=kl), BETA, ALPHA, variant)
    want = []
    for p in (0, 1):
        delta_w = by_hand(p, True, lambda i, t: t[2] - t[3])
        delta_l = by_hand(p, False, lambda i, t: t[2] - t[3])
        kl_w = by_hand(p, True, lambda i, t: t[4])
        kl_l = by_hand(p, False, lambda i, t: t[4])
        weight = 1.0 if variant == 1 else ALPHA
        want.append(neg_log_sigmoid(BETA * ((delta_w - delta_l) - weight * (kl_l - kl_w))))
    # pair 0 by eye: TDPO1 = -log sigmoid(0.1 (-0.7 - (0.30 - 0.25)))
    assert want[0] == pytest.approx(
        neg_log_sigmoid(0.1 * (-0.7 - 0.05)) if variant == 1 else neg_log_sigmoid(0.1 * (-0.7 - 0.5 * 0.05))
    )
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_tdpo2_stops_the_gradient_through_seqkl_w():
    """TDPO2: no gradient reaches the chosen tokens' KL; the rejected ones get beta alpha sigma(-x).
    TDPO1 differs there (beta sigma(-x) on both sides)."""
    for variant in (1, 2):
        pair, chosen, logp, ref, kl = tensors(requires_grad=True)
        tdpo_loss(pair_sums(logp, ref, pair, chosen, 2, kl=kl), BETA, ALPHA, variant).sum().backward()
        for i, (p, side, *_rest) in enumerate(TOKENS):
            delta = [by_hand(p, s, lambda j, t: t[2] - t[3]) for s in (True, False)]
            seq_kl = [by_hand(p, s, lambda j, t: t[4]) for s in (True, False)]
            coef = 1.0 if variant == 1 else ALPHA
            x = BETA * ((delta[0] - delta[1]) - coef * (seq_kl[1] - seq_kl[0]))
            sigma = 1.0 / (1.0 + math.exp(x))  # sigma(-x) = -dL/dx
            if side:
                want = -BETA * sigma if variant == 1 else 0.0  # dx/dKL_w = +beta (TDPO1)
            else:
                want = BETA * coef * sigma  # dx/dKL_l = -beta coef
            assert kl.grad[i].item() == pytest.approx(want, abs=1e-15), (variant, i)


def test_sparsepo_by_hand():
    pair, chosen, logp, ref, kl = tensors()
    m_u = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0, 0.25], dtype=torch.float64)
    m_d = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.3, 0.0, 1.0], dtype=torch.float64)
    lam_u, lam_d = 0.01, 0.02
    got = sparsepo_loss(
        pair_sums(logp, ref, pair, chosen, 2, kl=kl, reward_weight=m_u, kl_weight=m_d), BETA, lam_u, lam_d
    )
    want = []
    for p in (0, 1):
        u = by_hand(p, True, lambda i, t: m_u[i].item() * (t[2] - t[3])) - by_hand(
            p, False, lambda i, t: m_u[i].item() * (t[2] - t[3])
        )
        d = by_hand(p, False, lambda i, t: m_d[i].item() * t[4]) - by_hand(
            p, True, lambda i, t: m_d[i].item() * t[4]
        )
        l1_u = sum(abs(m_u[i].item()) for i, t in enumerate(TOKENS) if t[0] == p)
        l1_d = sum(abs(m_d[i].item()) for i, t in enumerate(TOKENS) if t[0] == p)
        want.append(neg_log_sigmoid(BETA * (u - d)) + lam_u * l1_u + lam_d * l1_d)
    # pair 0 by eye: u = 1 * 0.5 + 0 - 0.5 * 0.2 = 0.4; d = 0.30 - 0.05 = 0.25; |m^u| 1.5, |m^d| 2
    assert want[0] == pytest.approx(neg_log_sigmoid(0.1 * 0.15) + 0.01 * 1.5 + 0.02 * 2.0)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_sparsepo_with_masks_one_is_tdpo1():
    """Equal values with lambda 0; with lambda > 0 the L1 terms add the token counts, a
    constant, so the gradients are still TDPO1's."""
    pair, chosen, logp, ref, kl = tensors(requires_grad=True)
    tdpo = tdpo_loss(pair_sums(logp, ref, pair, chosen, 2, kl=kl), BETA, variant=1)
    tdpo.sum().backward()
    want_grads = logp.grad.clone(), kl.grad.clone()
    logp.grad = kl.grad = None
    ones = torch.ones(len(TOKENS), dtype=torch.float64)
    sums = pair_sums(logp, ref, pair, chosen, 2, kl=kl, reward_weight=ones, kl_weight=ones)
    torch.testing.assert_close(sparsepo_loss(sums, BETA), tdpo, rtol=1e-14, atol=0)
    sparse = sparsepo_loss(sums, BETA, lambda_u=0.1, lambda_d=0.2)
    torch.testing.assert_close(sparse - tdpo, torch.tensor([0.3 * 3, 0.3 * 4], dtype=torch.float64))
    sparse.sum().backward()
    torch.testing.assert_close((logp.grad, kl.grad), want_grads, rtol=1e-14, atol=0)


def test_cdpo_by_hand_and_with_weights_one_is_dpo():
    pair, chosen, logp, ref, _ = tensors()
    # critical weights on rejected tokens, 1 on chosen ones
    w = torch.tensor([1.0, 1.0, 0.4, 1.0, 0.9, 0.1, 0.0], dtype=torch.float64)
    cfg = PreferenceConfig(loss="cdpo", beta=BETA)
    got = preference_loss(pair_sums(logp, ref, pair, chosen, 2, reward_weight=w), cfg)
    want = []
    for p in (0, 1):
        delta_w = by_hand(p, True, lambda i, t: t[2] - t[3])
        weighted_l = by_hand(p, False, lambda i, t: w[i].item() * (t[2] - t[3]))
        want.append(neg_log_sigmoid(BETA * (delta_w - weighted_l)))
    # pair 1 by eye: -log sigmoid(0.1 (0.1 - (0.9 * 0.8 + 0.1 * 0 + 0 * -0.5)))
    assert want[1] == pytest.approx(neg_log_sigmoid(0.1 * (0.1 - 0.72)))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)

    ones = preference_loss(pair_sums(logp, ref, pair, chosen, 2, reward_weight=torch.ones_like(w)), cfg)
    dpo = preference_loss(pair_sums(logp, ref, pair, chosen, 2), PreferenceConfig(beta=BETA))
    torch.testing.assert_close(ones, dpo, rtol=1e-14, atol=0)


def test_losses_need_their_inputs():
    pair, chosen, logp, ref, kl = tensors()
    with pytest.raises(ValueError, match="tdpo1 needs PairSums.kl: pass kl"):
        tdpo_loss(pair_sums(logp, ref, pair, chosen, 2))
    with pytest.raises(ValueError, match="sparsepo needs PairSums.reward_l1: pass reward_weight"):
        sparsepo_loss(pair_sums(logp, ref, pair, chosen, 2, kl=kl))


# ----- exactness under any split of the tokens -------------------------------------------


def random_batch(num_pairs=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (num_pairs, 2), generator=g)
    pair = torch.cat([torch.full((int(lengths[p, s]),), p) for p in range(num_pairs) for s in (0, 1)])
    chosen = torch.cat([torch.full((int(lengths[p, s]),), s == 0) for p in range(num_pairs) for s in (0, 1)])
    n = pair.numel()
    logp = (-torch.rand(n, generator=g) * 3).requires_grad_(True)
    ref = -torch.rand(n, generator=g) * 3
    kl = (torch.rand(n, generator=g) * 0.5).requires_grad_(True)
    m_u = (torch.rand(n, generator=g) - 0.3).clamp(min=0).requires_grad_(True)  # learned masks: grad
    m_d = (torch.rand(n, generator=g) - 0.3).clamp(min=0).requires_grad_(True)
    return pair, chosen, logp, ref, kl, m_u, m_d


LOSSES = [
    PreferenceConfig(loss="dpo"),
    PreferenceConfig(loss="tdpo1"),
    PreferenceConfig(loss="tdpo2", alpha=0.7),
    PreferenceConfig(loss="sparsepo", lambda_u=0.05, lambda_d=0.02),
    PreferenceConfig(loss="cdpo"),
]


def sums_of(idx, pair, chosen, logp, ref, kl, m_u, m_d, cfg, num_pairs):
    kw = {}
    if cfg.loss != "dpo" and cfg.loss != "cdpo":
        kw["kl"] = kl[idx]
    if cfg.loss in ("sparsepo", "cdpo"):
        kw["reward_weight"] = m_u[idx]
    if cfg.loss == "sparsepo":
        kw["kl_weight"] = m_d[idx]
    return pair_sums(logp[idx], ref[idx], pair[idx], chosen[idx], num_pairs, **kw)


@pytest.mark.parametrize("cfg", LOSSES, ids=lambda c: c.loss)
@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_split_sums_and_gradients_equal_the_whole(cfg, parts):
    """Tokens shuffled and cut into `parts` micro-batches (pairs split across them), dealt
    to 2 'ranks': the partial sums add up to the whole, and the two-pass surrogate
    (loss_coefficients at the all-reduced sums) gives the whole loss's gradient."""
    num_pairs = 6
    batch = random_batch(num_pairs, seed=parts)
    params = [batch[2], batch[4], batch[5], batch[6]]  # logp, kl, m_u, m_d
    every = torch.arange(batch[0].numel())
    whole = sums_of(every, *batch, cfg, num_pairs)
    loss_fn = lambda s: preference_loss(s, cfg).mean()  # noqa: E731
    loss_fn(whole).backward()
    want = [p.grad for p in params]  # None where the loss does not read the tensor
    for p in params:
        p.grad = None

    order = torch.randperm(every.numel(), generator=torch.Generator().manual_seed(parts))
    micro = list(order.tensor_split(parts))
    ranks = [micro[0::2], micro[1::2]]
    with torch.no_grad():  # pass 1: partial sums per micro-batch, summed per rank, then "all-reduced"
        per_rank = [
            reduce(operator.add, (sums_of(i, *batch, cfg, num_pairs) for i in mbs)) for mbs in ranks if mbs
        ]
        total = reduce(operator.add, per_rank)
    for name, value in whole.items():
        torch.testing.assert_close(getattr(total, name), value.detach(), rtol=1e-12, atol=1e-12)

    coef = loss_coefficients(loss_fn, total)
    for mbs in ranks:  # pass 2: each micro-batch backpropagates its surrogate
        for i in mbs:
            surrogate(sums_of(i, *batch, cfg, num_pairs), coef).backward()
    for p, w in zip(params, want):
        if w is None:
            assert p.grad is None or not p.grad.any()
        else:
            torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)


def test_per_micro_batch_losses_of_split_pairs_are_not_exact():
    """The constraint the trainer must respect: a pair's loss needs its complete sums."""
    batch = random_batch(4, seed=11)
    cfg = PreferenceConfig(loss="tdpo1")
    n = batch[0].numel()
    whole = preference_loss(sums_of(torch.arange(n), *batch, cfg, 4), cfg).sum()
    halves = torch.arange(n).tensor_split(2)
    split = sum(preference_loss(sums_of(h, *batch, cfg, 4), cfg).sum() for h in halves)
    assert abs(whole.item() - split.item()) > 1e-3
    # pair-atomic micro-batches are exact: each pair's sums are complete where its loss is taken
    pair = batch[0]
    atomic = [torch.nonzero(pair < 2).squeeze(1), torch.nonzero(pair >= 2).squeeze(1)]
    by_pair = sum(preference_loss(sums_of(i, *batch, cfg, 4), cfg)[pair[i].unique()].sum() for i in atomic)
    torch.testing.assert_close(by_pair, whole)


def test_coefficients_of_tdpo2_are_zero_on_seqkl_w():
    batch = random_batch(3, seed=5)
    cfg = PreferenceConfig(loss="tdpo2")
    with torch.no_grad():
        total = sums_of(torch.arange(batch[0].numel()), *batch, cfg, 3)
    coef = loss_coefficients(lambda s: preference_loss(s, cfg).mean(), total)
    assert torch.equal(coef.kl[:, 0], torch.zeros(3, dtype=torch.float64))
    assert (coef.kl[:, 1] != 0).all() and (coef.delta != 0).all()
    assert torch.equal(coef.logp, torch.zeros_like(coef.logp))  # a metric: not in the loss


def test_pair_sums_add():
    batch = random_batch(2)
    a = sums_of(torch.arange(3), *batch, LOSSES[0], 2)
    b = sums_of(torch.arange(3), *batch, LOSSES[1], 2)
    with pytest.raises(ValueError, match="cannot add"):
        a + b


# ----- metrics --------------------------------------------------------------------------


def test_metrics_by_hand():
    pair, chosen, logp, ref, kl = tensors()
    m = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    sums = pair_sums(logp, ref, pair, chosen, 2, kl=kl, reward_weight=m, kl_weight=m)
    got = preference_metrics(sums, PreferenceConfig(loss="sparsepo", beta=0.1))
    # weighted Delta: pair 0 w 0.5, l 0.1; pair 1 w 0.2, l 0 -> rewards x 0.1
    assert got["rewards/chosen"] == pytest.approx((0.05 + 0.02) / 2)
    assert got["rewards/rejected"] == pytest.approx((0.01 + 0.0) / 2)
    assert got["rewards/accuracy"] == 1.0
    assert got["rewards/margin"] == pytest.approx((0.04 + 0.02) / 2)
    assert got["logps/chosen"] == pytest.approx((-3.0 - 0.3) / 2)
    assert got["logps/rejected"] == pytest.approx((-0.5 - 4.3) / 2)
    assert got["kl/per_token"] == pytest.approx(1.30 / 7)
    assert got["kl/chosen_per_token"] == pytest.approx(0.35 / 3)
    assert got["mask_u/mean"] == pytest.approx(4.5 / 7)
    assert got["mask_u/sparsity"] == pytest.approx(3 / 7)
    assert got["mask_d/sparsity"] == pytest.approx(3 / 7)
    cdpo = preference_metrics(
        pair_sums(logp, ref, pair, chosen, 2, reward_weight=m), PreferenceConfig(loss="cdpo")
    )
    assert cdpo["critical_weight/mean"] == pytest.approx((0.5 + 0.0 + 1.0 + 0.0) / 4)
    assert "kl/per_token" not in cdpo and "mask_u/mean" not in cdpo


def test_config_rejects_settings_of_another_loss():
    with pytest.raises(ValueError, match="alpha is set but algorithm.loss is 'tdpo1'"):
        PreferenceConfig(loss="tdpo1", alpha=0.3)
    with pytest.raises(ValueError, match="lambda_u is set"):
        PreferenceConfig(loss="dpo", lambda_u=0.1)
    assert isinstance(PreferenceConfig(loss="sparsepo", lambda_d=0.1), PreferenceConfig)
    assert PairSums.__dataclass_fields__.keys() >= {"delta", "kl", "reward_l1"}
