"""Off-policy correction weights (algorithms/off_policy.py) against the formulas of
docs/algorithms.md section 7, written out token by token (and sequence by sequence) in plain
Python with math.exp, on planted ratios pi_prox / pi_b that hit every branch: inside the
bounds, capped and masked."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms.off_policy import Correction, behaviour_weights
from rlpost.config.asynchrony import OffPolicyConfig
from rlpost.tracking.metrics import MetricSums

# token ratios: inside every bound, under icepop's 0.5, over tis's 2, over icepop's 5
TOKEN_RATIOS = [[1.2, 0.4, 3.0], [0.9, 6.0], [0.3, 1.9, 2.5, 0.7]]
# seq_mask with cap 1.5 inside [0.5, 3]: masked low, masked high, capped, inside
SEQ_RHOS = [0.2, 5.0, 2.0, 0.8]
SEQ_LENGTHS = [3, 1, 4, 2]
SEQ_CFG = dict(seq_cap=1.5, seq_low=0.5, seq_high=3.0)


def planted(log_ratios: list[list[float]], seed: int = 0):
    """pi_prox log-probs, pi_b log-probs (pi_prox's minus the planted log ratio), seq_index,
    as tensors and as the lists of floats the reference loops read."""
    g = torch.Generator().manual_seed(seed)
    flat = [r for seq in log_ratios for r in seq]
    prox = torch.log(torch.rand(len(flat), generator=g, dtype=torch.float64) * 0.9 + 0.05)
    behaviour = prox - torch.tensor(flat, dtype=torch.float64)
    seq_index = torch.tensor([i for i, seq in enumerate(log_ratios) for _ in seq])
    return prox, behaviour, seq_index


def token_ratio_logs() -> list[list[float]]:
    return [[math.log(r) for r in seq] for seq in TOKEN_RATIOS]


def sequence_logs(geometric: bool, seed: int = 1) -> list[list[float]]:
    """Per-token log ratios, random but summing (product) or averaging (geometric) to log rho_i."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rho, n in zip(SEQ_RHOS, SEQ_LENGTHS):
        parts = (torch.randn(n, generator=g, dtype=torch.float64) * 0.5).tolist()
        target = math.log(rho) * (n if geometric else 1)
        parts[-1] += target - sum(parts)
        out.append(parts)
    return out


def reference(prox, behaviour, seq_index, cfg: Correction) -> tuple[list[float], list[bool], list[bool]]:
    """Weights, capped and masked flags per token, straight from the formulas."""
    prox, behaviour, seqs = prox.tolist(), behaviour.tolist(), seq_index.tolist()
    ratios = [math.exp(p - b) for p, b in zip(prox, behaviour)]
    w, capped, masked = [], [], []
    for t, ratio in enumerate(ratios):
        if cfg.correction == "none":
            w.append(1.0), capped.append(False), masked.append(False)
        elif cfg.correction == "decoupled":
            w.append(ratio), capped.append(False), masked.append(False)
        elif cfg.correction == "tis":
            w.append(min(ratio, cfg.tis_cap)), capped.append(ratio > cfg.tis_cap), masked.append(False)
        elif cfg.correction == "icepop":
            inside = cfg.icepop_low <= ratio <= cfg.icepop_high
            w.append(ratio if inside else 0.0), capped.append(False), masked.append(not inside)
        else:
            mine = [ratios[u] for u in range(len(ratios)) if seqs[u] == seqs[t]]
            rho = 1.0
            for r in mine:
                rho *= r
            if cfg.seq_geometric:
                rho = rho ** (1.0 / len(mine))
            inside = cfg.seq_low <= rho <= cfg.seq_high
            w.append(min(rho, cfg.seq_cap) if inside else 0.0)
            capped.append(inside and rho > cfg.seq_cap)
            masked.append(not inside)
    return w, capped, masked


CASES = [
    ("none", {}, token_ratio_logs),
    ("decoupled", {}, token_ratio_logs),
    ("tis", {}, token_ratio_logs),
    ("icepop", {}, token_ratio_logs),
    ("seq_mask", SEQ_CFG, lambda: sequence_logs(False)),
    ("seq_mask", {**SEQ_CFG, "seq_geometric": True}, lambda: sequence_logs(True)),
]


@pytest.mark.parametrize("correction, params, logs", CASES, ids=[c[0] + str(c[1])[:30] for c in CASES])
def test_weights_and_metrics_match_the_formula(correction, params, logs):
    cfg = Correction(correction, **params)
    prox, behaviour, seq_index = planted(logs())
    w, metrics = behaviour_weights(prox.float(), behaviour.float(), seq_index, cfg)
    want_w, want_capped, want_masked = reference(
        prox.float().double(), behaviour.float().double(), seq_index, cfg
    )
    assert w.dtype == torch.float64 and not w.requires_grad
    torch.testing.assert_close(w, torch.tensor(want_w, dtype=torch.float64), rtol=1e-12, atol=0)
    if correction == "none":
        assert metrics == {}
        return
    # every branch the correction has fires on the planted ratios
    if correction in ("tis", "seq_mask"):
        assert any(want_capped)
    if correction in ("icepop", "seq_mask"):
        assert any(want_masked) and not all(want_masked)
    sums = MetricSums()
    for name, values in metrics.items():
        sums.add_tokens(name, values)
    got = sums.result()
    n = len(want_w)
    want = {
        "off_policy/weight_mean": sum(want_w) / n,
        "off_policy/weight_min": min(want_w),
        "off_policy/weight_max": max(want_w),
    }
    if correction in ("tis", "seq_mask"):
        want["off_policy/truncated_frac"] = sum(want_capped) / n
    if correction in ("icepop", "seq_mask"):
        want["off_policy/masked_frac"] = sum(want_masked) / n
    assert got == pytest.approx(want, rel=1e-12)


def test_planted_values():
    """The branches by hand, independent of the reference loop: tis caps 3 and 2.5 at 2;
    icepop zeroes 0.4, 6 and 0.3; seq_mask gives 0, 0, 1.5 (capped 2), 0.8."""
    prox, behaviour, seq_index = planted(token_ratio_logs())
    tis, _ = behaviour_weights(prox, behaviour, seq_index, Correction("tis"))
    ice, _ = behaviour_weights(prox, behaviour, seq_index, Correction("icepop"))
    assert tis.tolist() == pytest.approx([1.2, 0.4, 2.0, 0.9, 2.0, 0.3, 1.9, 2.0, 0.7])
    assert ice.tolist() == pytest.approx([1.2, 0.0, 3.0, 0.9, 0.0, 0.0, 1.9, 2.5, 0.7])
    for geometric in (False, True):
        prox, behaviour, seq_index = planted(sequence_logs(geometric))
        w, _ = behaviour_weights(
            prox, behaviour, seq_index, Correction("seq_mask", **SEQ_CFG, seq_geometric=geometric)
        )
        per_seq = [0.0, 0.0, 1.5, 0.8]
        assert w.tolist() == pytest.approx([per_seq[i] for i in seq_index.tolist()])


def test_long_sequences_do_not_overflow():
    """A product of 1000 ratios e^1 overflows fp64 (masked, not nan); +700 then -700 is 1."""
    logs = [[1.0] * 1000, [700.0, -700.0, 0.1]]
    prox, behaviour, seq_index = planted(logs)
    w, metrics = behaviour_weights(prox, behaviour, seq_index, Correction("seq_mask"))
    assert w[:1000].eq(0).all() and w[1000:].tolist() == pytest.approx([math.exp(0.1)] * 3, rel=1e-9)
    # geometric means e (inside [0.5, 3], capped at 2.5) and e^0.0333
    cfg = Correction("seq_mask", seq_high=3.0, seq_cap=2.5, seq_geometric=True)
    geo, _ = behaviour_weights(prox, behaviour, seq_index, cfg)
    assert geo[:1000].tolist() == pytest.approx([2.5] * 1000)
    assert geo[1000:].tolist() == pytest.approx([math.exp(0.1 / 3)] * 3, rel=1e-9)
    assert torch.isfinite(metrics["off_policy/weight_mean"]).all()


@pytest.mark.parametrize("correction", ["tis", "icepop", "seq_mask"])
def test_split_into_micro_batches_gives_the_same_weights(correction):
    """seq_index is local to a micro-batch: weights of each part (renumbered from 0) equal
    the whole's, since a weight depends only on its own sequence."""
    logs = sequence_logs(False) if correction == "seq_mask" else token_ratio_logs()
    cfg = Correction(correction, **(SEQ_CFG if correction == "seq_mask" else {}))
    prox, behaviour, seq_index = planted(logs)
    whole, _ = behaviour_weights(prox, behaviour, seq_index, cfg)
    cut = int((seq_index < 2).sum())
    # the parts are told their sequence count, as the learner does (len of the micro-batch)
    parts = [
        behaviour_weights(prox[s], behaviour[s], seq_index[s] - seq_index[s][0], cfg, n)[0]
        for s, n in ((slice(0, cut), 2), (slice(cut, None), len(logs) - 2))
    ]
    assert torch.equal(torch.cat(parts), whole)


def test_gradient_is_stopped():
    prox = torch.log(torch.tensor([0.5, 0.2], requires_grad=True))
    w, _ = behaviour_weights(
        prox, torch.log(torch.tensor([0.4, 0.3])), torch.tensor([0, 0]), Correction("tis")
    )
    assert not w.requires_grad


def test_keys_are_the_config_sections():
    """The learner builds Correction from TrainConfig.off_policy's dump: same keys, same defaults."""
    assert Correction(**OffPolicyConfig().model_dump()) == Correction()
    section = OffPolicyConfig(correction="seq_mask", seq_geometric=True, seq_cap=1.5)
    assert Correction(**section.model_dump()) == Correction("seq_mask", seq_geometric=True, seq_cap=1.5)
    with pytest.raises(ValueError, match="unknown off-policy correction 'ppo'"):
        Correction("ppo")
