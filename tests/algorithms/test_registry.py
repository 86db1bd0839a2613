"""The registry and the three kinds: names and import paths resolved and checked by kind,
sampling rules rebuilt from their dicts (old checkpoints' too), and each kind holding only
the methods it has."""

from __future__ import annotations

import pytest
import torch

from rlpost.algorithms import (
    ALGORITHMS,
    PairLoss,
    PolicyGradient,
    SamplingRule,
    TokenLoss,
    algorithm_class,
    build_algorithm,
    kind_of,
    sampling_rule_from_dict,
)
from rlpost.algorithms.hapo import EntropyStats, TemperatureRule
from rlpost.errors import ConfigError


def test_every_algorithm_is_of_one_kind():
    kinds = {name: kind_of(cls) for name, cls in ALGORITHMS.items()}
    assert kinds == {
        "grpo": PolicyGradient,
        "hapo": PolicyGradient,
        "gspo": PolicyGradient,
        "gspo_token": PolicyGradient,
        "cispo": PolicyGradient,
        "gmpo": PolicyGradient,
        "sapo": PolicyGradient,
        "dppo": PolicyGradient,
        "clip_cov": PolicyGradient,
        "kl_cov": PolicyGradient,
        "ppo": PolicyGradient,
        "vineppo": PolicyGradient,
        "pure": PolicyGradient,
        "prime": PolicyGradient,
        "optimal_baseline": PolicyGradient,
        "ceeh": PolicyGradient,
        "preference": PairLoss,
        "sft": TokenLoss,
        "sstoken": TokenLoss,
    }
    # a method of another kind is absent, not a stub that raises
    assert not hasattr(build_algorithm("sft", {}), "advantages")
    assert not hasattr(build_algorithm("preference", {}), "advantages")
    assert not hasattr(build_algorithm("preference", {}), "token_loss")


@pytest.mark.parametrize(
    "name, kind, message",
    [
        (
            "preference",
            PolicyGradient,
            "key 'algorithm.name': preference is a pair loss; `rlpost train` runs "
            "policy-gradient algorithms (grpo, hapo, gspo, gspo_token, cispo, gmpo, sapo, dppo, "
            "clip_cov, kl_cov, ppo, vineppo, pure, prime, optimal_baseline, ceeh, or pkg.module:Class)",
        ),
        ("grpo", PairLoss, "grpo is a policy-gradient algorithm; `rlpost dpo` runs pair losses (preference"),
        ("grpo", TokenLoss, "grpo is a policy-gradient algorithm; `rlpost sft` runs token losses (sft"),
        (
            "dapo",
            None,
            "unknown algorithm 'dapo'; known: ceeh, cispo, clip_cov, dppo, gmpo, grpo, gspo, gspo_token, "
            "hapo, kl_cov, optimal_baseline, ppo, preference, prime, pure, sapo, sft, sstoken, vineppo",
        ),
        ("rlpost.algorithms.nope:X", None, "no module 'rlpost.algorithms.nope'"),
        ("rlpost.algorithms.hapo:TemperatureRule", PolicyGradient, "is not an algorithm"),
    ],
)
def test_wrong_name_or_kind_is_one_line(name, kind, message):
    with pytest.raises(ConfigError) as e:
        build_algorithm(name, {}, kind)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_import_path_names_the_class():
    assert algorithm_class("rlpost.algorithms.gspo:GSPO", PolicyGradient) is ALGORITHMS["gspo"]
    assert build_algorithm("rlpost.algorithms.sft:SFT", {"loss": "dft"}, TokenLoss).cfg.loss == "dft"


def test_sampling_rule_from_its_dict_and_from_an_old_checkpoint():
    rule = TemperatureRule(EntropyStats(p=-1.0, s=0.5, max_pos=2.0, min_neg=-3.0), tau=0.05)
    assert isinstance(rule, SamplingRule)
    d = rule.to_dict()
    assert d["rule"] == "rlpost.algorithms.hapo:TemperatureRule"
    assert sampling_rule_from_dict(d) == rule
    old = {k: v for k, v in d.items() if k != "rule"}  # written before rules named their class
    assert sampling_rule_from_dict(old) == rule
    entropy = torch.rand(5)
    torch.testing.assert_close(sampling_rule_from_dict(old).factor(entropy), rule.factor(entropy))


def test_pair_loss_reaches_its_machinery_through_the_object():
    dpo = build_algorithm("preference", {})
    assert (dpo.activation_masks, dpo.learned_masks, dpo.critical_weights) == (False, False, False)
    assert dpo.needs.reference and not dpo.needs.token_kl
    sums = dpo.pair_sums(
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-1.5, -1.0]),
        torch.tensor([0, 0]),
        torch.tensor([True, False]),
        1,
    )
    assert dpo.pair_loss(sums).shape == (1,) and "rewards/margin" in dpo.metrics(sums)
    learned = build_algorithm("preference", {"loss": "sparsepo", "masks": "independent"})
    assert learned.learned_masks and learned.needs.token_kl
    a, b = learned.mask_networks(2, 8, seed=1), learned.mask_networks(2, 8, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    activation = build_algorithm("preference", {"loss": "sparsepo"})
    mask = activation.activation_mask(
        {"mlp": [torch.tensor([[[1.0], [3.0], [2.0]]])]}, torch.tensor([[True, True, False]])
    )
    torch.testing.assert_close(mask, torch.tensor([[0.0, 1.0, 0.0]]))
