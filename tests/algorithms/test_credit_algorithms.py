"""The section-5 algorithms (docs/algorithms.md) turn their inputs into per-token advantages
as the formulas say, with numbers worked here by hand; their config is refused where a key
would be ignored."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.advantages import grpo
from rlpost.algorithms.base import CreditInputs, TokenTensors
from rlpost.algorithms.prime import IMPLICIT_PRM_LOSS, OUTCOME_LABEL
from rlpost.config.load import validate_config
from rlpost.config.rl import TrainConfig
from rlpost.errors import ConfigError

# two groups of two responses: lengths 2, 1 | 0, 3
LENGTHS = torch.tensor([[2, 1], [0, 3]])
REWARDS = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)


def test_ppo_gae_by_hand_and_whitening():
    values = torch.tensor([0.5, 0.25, 0.5, 0.0, 0.5, 0.75])  # V(s_t) of the 6 tokens
    algo = build_algorithm("ppo", {"gamma": 1.0, "lam": 0.5, "whiten": False})
    credit = algo.credit(CreditInputs(REWARDS, LENGTHS, values=values))
    # response 0: deltas (0 + 0.25 - 0.5, 1 - 0.25) = (-0.25, 0.75); A = (-0.25 + 0.5 * 0.75, 0.75)
    # response 1: delta 0 - 0.5; response 3: deltas (0.5 - 0, 0.75 - 0.5, 1 - 0.75)
    #   A_3 = 0.25, A_2 = 0.25 + 0.5 * 0.25, A_1 = 0.5 + 0.5 * 0.375
    expected = torch.tensor([0.125, 0.75, -0.5, 0.6875, 0.375, 0.25])
    torch.testing.assert_close(credit.advantages, expected)
    torch.testing.assert_close(credit.returns, expected + values)
    var_r = torch.var(expected + values, unbiased=False)
    ev = 1 - torch.var(expected, unbiased=False) / var_r
    assert credit.metrics["critic/explained_variance"] == pytest.approx(ev.item(), rel=1e-5)
    whitened = build_algorithm("ppo", {"lam": 0.5}).credit(CreditInputs(REWARDS, LENGTHS, values=values))
    torch.testing.assert_close(
        whitened.advantages, (expected - expected.mean()) / (expected.std(unbiased=False) + 1e-8)
    )
    torch.testing.assert_close(whitened.returns, credit.returns)


def test_prime_credit_by_hand():
    beta = 0.5
    prm = torch.tensor([0.0, 0.0, -1.0, 0.0, 0.0, 0.0])
    ref = torch.tensor([-2.0, 0.0, 0.0, 0.0, -1.0, 0.0])
    algo = build_algorithm("prime", {"beta": beta})
    credit = algo.credit(CreditInputs(REWARDS, LENGTHS, prm_logp=prm, prm_ref_logp=ref))
    # token rewards r = beta (prm - ref) = (1, 0 | -0.5 | ; 0, 0.5, 0); means: 0.5, -0.5 | 0, 1/6
    # group 0: b_0 = -0.5, b_1 = 0.5; outcome RLOO (1, -1). group 1: b_2 = 1/6, b_3 = 0; RLOO (-1, 1)
    expected = [
        (1 + 0.5) + (0 + 0.5) + 1,  # t=0 of response 0: sum over s >= 0 of (r_s - b)
        (0 + 0.5) + 1,
        (-0.5 - 0.5) - 1,
        (0 + 0.5 + 0) + 1,
        (0.5 + 0) + 1,
        0 + 1,
    ]
    torch.testing.assert_close(credit.advantages, torch.tensor(expected))


def test_optimal_baseline_reads_the_sampled_probability_and_collision():
    old_logp = torch.log(torch.tensor([0.5, 0.5, 0.25, 1.0, 1.0, 1.0]))
    collision = torch.tensor([0.5, 0.5, 0.25, 1.0, 1.0, 1.0])
    algo = build_algorithm("optimal_baseline", {})
    credit = algo.credit(CreditInputs(REWARDS, LENGTHS, old_logp=old_logp, collision=collision))
    # W of response 0: 1 - 1 + 0.5 per token -> (0.5, 1.0); response 1: 1 - 0.5 + 0.25 = 0.75
    # group 0 at t=0: B = (1 * 0.5 + 0 * 0.75) / 1.25 = 0.4; at t=1 only response 0: B = 1
    # group 1: response 3 alone with W = 0 (pi = 1): B = 0 / 1e-8 = 0
    expected = torch.tensor([1 - 0.4, 1 - 1.0, 0 - 0.4, 1.0, 1.0, 1.0])
    torch.testing.assert_close(credit.advantages, expected, rtol=1e-6, atol=1e-6)


def test_vineppo_and_pure_use_the_step_inputs():
    ends = [torch.tensor([1, 2]), torch.tensor([1]), torch.tensor([], dtype=torch.long), torch.tensor([2, 3])]
    vine = build_algorithm("vineppo", {}).credit(
        CreditInputs(
            REWARDS,
            LENGTHS,
            step_ends=ends,
            state_values=[
                torch.tensor([0.0, 0.5]),
                torch.tensor([1.0]),
                torch.tensor([0.5]),
                torch.tensor([0.0, 0.25]),
            ],
        )
    )
    # response 0: (0.5 - 0, 1 - 0.5); response 1: 0 - 1; response 3: (0.25 - 0) x 2 tokens, 1 - 0.25
    torch.testing.assert_close(vine.advantages, torch.tensor([0.5, 0.5, -1.0, 0.25, 0.25, 0.75]))
    step_rewards = [torch.tensor([0.0, 1.0]), torch.tensor([1.0]), torch.tensor([]), torch.tensor([1.0, 0.0])]
    pure = build_algorithm("pure", {}).credit(
        CreditInputs(REWARDS, LENGTHS, step_ends=ends, step_rewards=step_rewards)
    )
    # min-form credits: response 0 (0, 1), response 1 (1,), response 3 (0, 0); whole returns 0, 1 | 0, 0
    # response 0: credit - b (b = 1) + RLOO 1; response 1: 1 - 0 - 1; response 3: 0 - 0 + 1
    torch.testing.assert_close(pure.advantages, torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0]))


def test_implicit_prm_loss_by_hand():
    loss_fn = build_algorithm(IMPLICIT_PRM_LOSS, {"beta": 0.5})
    logp = torch.tensor([-1.0, -1.0, -2.0], requires_grad=True)
    t = TokenTensors(
        logp=logp,
        old_logp=logp.detach(),
        advantages=torch.zeros(3),
        entropy=None,
        ref_logp=torch.tensor([-2.0, -1.0, -1.0]),
        seq_index=torch.tensor([0, 0, 1]),
        extra={OUTCOME_LABEL: torch.tensor([1.0, 1.0, 1.0])},
    )
    loss, metrics = loss_fn.token_loss(t)
    # z_0 = 0.5 * (1 + 0) = 0.5, z_1 = 0.5 * (-1) = -0.5; BCE(z, 1) = log(1 + e^-z)
    b0, b1 = math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(0.5))
    torch.testing.assert_close(loss, torch.tensor([b0, b0, b1], dtype=torch.float64))
    torch.testing.assert_close(metrics["accuracy"], torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))


def config(tree: dict) -> TrainConfig:
    return validate_config(TrainConfig, {"mode": "inprocess", **tree}, "test.yaml")


@pytest.mark.parametrize(
    "tree, words",
    [
        ({"critic": {"lr": 0.1}}, "critic.lr is set but algorithm 'grpo'"),
        ({"prm": {"lr": 0.1}, "algorithm": {"name": "ppo"}}, "prm.lr is set but algorithm 'ppo'"),
        ({"step_credit": {"split": ";"}, "algorithm": {"name": "prime"}}, "step_credit.split is set"),
        (
            {"algorithm": {"name": "pure", "temperature": 0.5}},
            "algorithm.temperature is set but algorithm.form",
        ),
        (
            {"algorithm": {"name": "ppo"}, "rollout": {"staleness": 1, "async_mode": "streaming"}},
            "async_mode 'streaming'",
        ),
    ],
)
def test_keys_the_algorithm_would_not_read_are_refused(tree, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
        config(tree)


def test_credit_sections_are_accepted_where_read():
    cfg = config({"algorithm": {"name": "ppo"}, "critic": {"lr": 0.1, "value_clip": None}})
    assert cfg.needs.values and cfg.critic.lr == 0.1
    assert config({"algorithm": {"name": "vineppo"}, "step_credit": {"split": ";"}}).needs.continuations == 9


def test_sequence_advantages_keep_their_float32_numerics():
    """The runtime hands every credit float64 rewards; an algorithm with sequence advantages
    gets them in float32, as before credit inputs existed, so a config's advantages (and a
    run's metrics) are bit for bit what they were (a float64 GRPO advantage differs in the
    last bits and, over 30 steps, moved the testbed's final accuracy by several points)."""
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    lengths = torch.tensor([[3, 4, 5], [1, 2, 3]])
    credit = build_algorithm("grpo", {}).credit(CreditInputs(rewards, lengths))
    expected = grpo(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))  # float32, as the runtime made them
    assert credit.advantages.dtype == torch.float32
    assert torch.equal(credit.advantages, expected)
    assert not torch.equal(grpo(rewards).float(), expected)  # float64 would not be the same
