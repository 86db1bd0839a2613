"""Loss-based sample reweighting (docs/algorithms.md section 8): the multipliers N w_i of
`algorithms/reweighting.py` against the formula written out below with hand-made numbers,
the learners' per-sample losses (`StepReweighting.token_scales`), and the `reweighting:`
config section."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.prime import IMPLICIT_PRM_LOSS
from rlpost.algorithms.reweighting import reweight_metrics, sample_multipliers
from rlpost.config.cdpo import stage_config
from rlpost.config.load import read_train_config, validate_config
from rlpost.config.offline import DPOJobConfig, SFTJobConfig
from rlpost.config.reweighting import ReweightingConfig
from rlpost.config.rl import TrainConfig
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_cdpo_config
from rlpost.tracking.metrics import MetricSums
from rlpost.workers.reweighting import StepReweighting, gather_losses
from tests.run_helpers import ROOT

F = {"linupper": lambda h: min(h + 1, 1), "mid": lambda h: 1 - h * h, "extremes": abs}


def expected_multipliers(losses: list[float], scheme: str, tau: float = 0.4) -> list[float]:
    """N w_i from the formula, in plain Python: h = 2 (l - min) / (max - min) - 1,
    w = softmax(f(h) / tau)."""
    lo, hi, n = min(losses), max(losses), len(losses)
    if lo == hi:
        return [1.0] * n
    e = [math.exp(F[scheme](2 * (x - lo) / (hi - lo) - 1) / tau) for x in losses]
    return [n * x / sum(e) for x in e]


LOSSES = [0.5, 1.0, 2.0, 3.0]  # h = -1, -0.6, 0.2, 1
# f / 0.4 by hand: linupper (0, 0.4, 1, 1), mid (0, 0.64, 0.96, 0), extremes (1, 0.6, 0.2, 1)
BY_HAND = {
    "linupper": [0.142434, 0.387175, 1.735196, 1.735196],
    "mid": [0.222516, 1.102131, 2.452837, 0.222516],
    "extremes": [1.597945, 0.587851, 0.216258, 1.597945],
}


@pytest.mark.parametrize("scheme", list(BY_HAND))
def test_multipliers_match_the_formula(scheme):
    got = sample_multipliers(torch.tensor(LOSSES, dtype=torch.float64), scheme, 0.4)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(BY_HAND[scheme], abs=2e-6)
    assert got.tolist() == pytest.approx(expected_multipliers(LOSSES, scheme), rel=1e-12)
    assert got.mean().item() == pytest.approx(1.0, rel=1e-12)
    # a permutation of the samples permutes their weights; a shift of every loss changes nothing
    order = [2, 0, 3, 1]
    torch.testing.assert_close(sample_multipliers(torch.tensor(LOSSES)[order], scheme, 0.4), got[order])
    torch.testing.assert_close(sample_multipliers(torch.tensor(LOSSES) + 7.0, scheme, 0.4), got)


@pytest.mark.parametrize("scheme", list(BY_HAND))
def test_temperature_and_the_shape_of_each_scheme(scheme):
    losses = [0.1, 0.35, 0.7, 1.3, 2.0, 2.05]
    for tau in (0.05, 1.0, 10.0):
        got = sample_multipliers(torch.tensor(losses, dtype=torch.float64), scheme, tau).tolist()
        assert got == pytest.approx(expected_multipliers(losses, scheme, tau), rel=1e-10)
    flat, sharp = (sample_multipliers(torch.tensor(losses), scheme, t) for t in (100.0, 0.1))
    assert (flat - 1).abs().max() < 0.02 < (sharp - 1).abs().max()  # tau -> inf: uniform
    if scheme == "linupper":  # the low-loss samples weigh less, the upper half all the same
        assert sharp[0] < sharp[1] < sharp[2] < sharp[3] == sharp[4] == sharp[5]
    if scheme == "extremes":  # both ends weigh the most
        assert sharp[2] < sharp[0] and sharp[2] < sharp[5]


def test_equal_losses_give_exactly_one():
    for losses in ([0.7] * 5, [2.5], []):
        got = sample_multipliers(torch.tensor(losses), "linupper", 0.4)
        assert torch.equal(got, torch.ones(len(losses), dtype=torch.float64))


def test_a_tiny_temperature_stays_finite():
    # mid at both ends is f = 0: exp(f / tau) alone would be exp(-1/tau) -> 0 for every sample
    got = sample_multipliers(torch.tensor([0.0, 1.0]), "mid", 1e-4)
    assert got.tolist() == [1.0, 1.0]
    got = sample_multipliers(torch.tensor([0.0, 0.5, 1.0]), "mid", 1e-4)
    assert got.tolist() == pytest.approx([0.0, 3.0, 0.0], abs=1e-12)
    assert torch.isfinite(sample_multipliers(torch.tensor([0.0, 1.0, 1e6]), "linupper", 1e-6)).all()


def test_metrics():
    m = sample_multipliers(torch.tensor(LOSSES), "linupper", 0.4)
    got = reweight_metrics(torch.tensor(LOSSES, dtype=torch.float64), m)
    # ESS / N = 1 / (N sum_i w_i^2), w = m / N
    assert got["reweight/ess_frac"] == pytest.approx(1 / (4 * sum((x / 4) ** 2 for x in BY_HAND["linupper"])))
    assert got["reweight/ess_frac"] == pytest.approx(0.645995, abs=1e-6)
    assert got["reweight/loss_spread"] == 2.5
    assert reweight_metrics(torch.ones(3), torch.ones(3))["reweight/ess_frac"] == 1.0


# ----- the learners' side ------------------------------------------------------------------


def step_reweighting(scheme="linupper", **keys) -> StepReweighting:
    cfg = SFTJobConfig(data={"path": "unused.jsonl"}, reweighting={"scheme": scheme, **keys})
    return StepReweighting.of(cfg, build_algorithm("sft", {}), 0, 1, torch.device("cpu"))


def test_token_scales_take_each_samples_loss_under_the_aggregation_weights():
    """Two micro-batches of 2 and 3 samples; sample 1 has no weighted token (masked out),
    sample 4's first token weighs 0. l_i = sum_t weight_t loss_t / sum_t weight_t."""
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    loss = [f64([1.0, 3.0, 5.0]), f64([2.0, 4.0, 6.0, 8.0, 9.0])]
    weights = [f64([0.1, 0.3, 0.0]), f64([0.2, 0.2, 0.1, 0.0, 0.1])]
    seq = [torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1, 2, 2])]
    scored = list(zip(loss, weights, seq, (2, 3)))
    metrics = MetricSums()
    scales = step_reweighting().token_scales(scored, metrics)
    # sample 0: (0.1 * 1 + 0.3 * 3) / 0.4 = 2.5; 2: 2; 3: (0.2 * 4 + 0.1 * 6) / 0.3; 4: 9
    want = expected_multipliers([2.5, 2.0, 1.4 / 0.3, 9.0], "linupper")
    assert [s.tolist() for s in scales] == [
        pytest.approx([want[0], 1.0], rel=1e-12),
        pytest.approx(want[1:], rel=1e-12),
    ]
    result = metrics.result()
    assert result["reweight/unweighted_loss"] == pytest.approx(0.1 + 0.9 + 0.4 + 0.8 + 0.6 + 0.9)
    assert result["reweight/weight_max"] == pytest.approx(max(want))
    assert result["reweight/weight_min"] == pytest.approx(min(want))
    assert result["reweight/loss_spread"] == pytest.approx(9.0 - 2.0)


def test_a_rank_without_samples_still_takes_part():
    scales = step_reweighting().token_scales([], MetricSums())
    assert scales == []
    everyone, mine = gather_losses(torch.tensor([1.0, 2.0]), 0, 1)
    assert everyone.tolist() == [1.0, 2.0] and mine == slice(0, 2)


def test_burn_in_counts_optimizer_steps():
    rw = step_reweighting(burn_in_steps=3)
    assert [rw.active(n) for n in range(5)] == [False, False, False, True, True]
    assert step_reweighting().active(0)


def test_which_learners_reweight():
    on = {"scheme": "extremes"}
    grpo, sft = build_algorithm("grpo", {}), build_algorithm("sft", {})
    prm = build_algorithm(IMPLICIT_PRM_LOSS, {})
    cpu = torch.device("cpu")
    assert StepReweighting.of(TrainConfig(reweighting=on), grpo, 0, 1, cpu).scheme == "extremes"
    # rlpost train's warm-up and implicit PRM get the same config and train unweighted
    assert StepReweighting.of(TrainConfig(reweighting=on), sft, 0, 1, cpu) is None
    assert StepReweighting.of(TrainConfig(reweighting=on), prm, 0, 1, cpu) is None
    assert StepReweighting.of(TrainConfig(), grpo, 0, 1, cpu) is None
    dpo = DPOJobConfig(data={"path": "x"}, reweighting=on)
    assert StepReweighting.of(dpo, build_algorithm("preference", {}), 0, 1, cpu) is not None


# ----- the config section ------------------------------------------------------------------


def test_defaults_are_off_on_every_job():
    for cfg in (TrainConfig(), SFTJobConfig(data={"path": "x"}), DPOJobConfig(data={"path": "x"})):
        assert cfg.reweighting == ReweightingConfig()
        section = cfg.reweighting
        assert (section.scheme, section.temperature, section.burn_in_steps) == ("none", 0.4, 0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reweighting.temperature=0.2"], "reweighting.temperature is set but reweighting.scheme is 'none'"),
        (
            ["reweighting.burn_in_steps=5"],
            "reweighting.burn_in_steps is set but reweighting.scheme is 'none'",
        ),
        (["reweighting.scheme=linupper", "reweighting.temperature=0"], "key 'reweighting.temperature'"),
        (["reweighting.scheme=linupper", "reweighting.burn_in_steps=-1"], "key 'reweighting.burn_in_steps'"),
        (["reweighting.scheme=quadratic"], "key 'reweighting.scheme'"),
        (["reweighting.tau=0.4"], "unknown key 'reweighting.tau'"),
    ],
)
def test_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        read_train_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_offline_jobs_refuse_the_same(tmp_path):
    tree = {"data": {"path": "x"}, "reweighting": {"temperature": 1.0}}
    with pytest.raises(ConfigError, match="reweighting.temperature is set"):
        validate_config(DPOJobConfig, tree, "dpo.yaml")
    cfg = validate_config(SFTJobConfig, {**tree, "reweighting": {"scheme": "mid", "temperature": 1.0}}, "s")
    assert cfg.reweighting.scheme == "mid" and cfg.reweighting.temperature == 1.0


@pytest.mark.parametrize(
    "section, dumped",
    [
        ({}, {"scheme": "none"}),
        ({"scheme": "mid"}, {"scheme": "mid", "temperature": 0.4, "burn_in_steps": 0}),
    ],
)
def test_the_dump_loads_again(section, dumped):
    """config.yaml (resume, sweeps) holds the keys of a chosen scheme only: the others, at
    their defaults, would be refused when it is read back."""
    cfg = TrainConfig(reweighting=section)
    tree = yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert tree["reweighting"] == dumped
    assert validate_config(TrainConfig, tree, "config.yaml").reweighting == cfg.reweighting


def test_cdpo_takes_it_per_training_stage():
    """`rlpost cdpo` trains in `rlpost sft` / `rlpost dpo` stages: the section goes under
    cdpo.contrast / cdpo.dpo, and at the top level (sampling only) it is refused."""
    config = ROOT / "configs" / "cdpo_quickstart.yaml"
    with pytest.raises(ConfigError, match="key 'reweighting.scheme' is for rlpost train"):
        load_cdpo_config(config, ["reweighting.scheme=linupper"])
    cfg = load_cdpo_config(config, ["cdpo.dpo.reweighting.scheme=mid"])
    assert stage_config(cfg, "dpo", "/start", "/pairs.jsonl").reweighting.scheme == "mid"
    assert stage_config(cfg, "positive", "/start", "/pos.jsonl").reweighting.scheme == "none"
