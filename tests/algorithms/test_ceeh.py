"""CEEH (docs/algorithms.md section 8): the accuracy and shortest-length EMAs, hardness, the
length reward and A' with numbers worked here by hand; its state survives a checkpoint; a CLI
run resumed from its first step repeats the second exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.base import CreditInputs
from rlpost.algorithms.ceeh import cosine_anneal, ema, entropy_bonus, length_rewards
from rlpost.config.load import validate_config
from rlpost.config.rl import TrainConfig
from rlpost.errors import ConfigError
from tests.run_helpers import read_metrics, run_train
from tests.runs.test_credit_runs import CHAIN, assert_resume_repeats


def batch(prompts, correct, rewards=None, lengths=None, entropy=None, step=1, total_steps=10):
    """CreditInputs of one batch: groups of len(correct[0]) responses; rewards default to the
    outcome, lengths to 1 token, entropies to 0."""
    ok = torch.tensor(correct, dtype=torch.bool)
    rewards = ok.double() if rewards is None else torch.tensor(rewards, dtype=torch.float64)
    lengths = torch.ones(ok.shape, dtype=torch.long) if lengths is None else torch.tensor(lengths)
    entropy = torch.zeros(int(lengths.sum())) if entropy is None else torch.tensor(entropy)
    return CreditInputs(
        rewards, lengths, step, total_steps, entropy=entropy, prompts=list(prompts), correct=ok
    )


def questions(algo) -> dict:
    return json.loads(json.dumps(algo.state_dict()))["questions"]


def test_ema_moves_up_fast_and_down_slowly():
    assert ema(None, 0.5, 0.2, 0.05) == 0.5  # the first value starts the EMA
    assert ema(0.5, 1.0, 0.2, 0.05) == pytest.approx(0.8 * 0.5 + 0.2 * 1.0)  # 0.6
    assert ema(0.5, 0.0, 0.2, 0.05) == pytest.approx(0.95 * 0.5)  # 0.475
    assert ema(0.5, 0.5, 0.2, 0.05) == 0.5
    algo = build_algorithm("ceeh", {})
    for step, correct in enumerate(([1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]), start=1):
        algo.credit(batch(["q"], [correct], step=step))
        assert questions(algo)["q"][0] == pytest.approx((0.5, 0.6, 0.95 * 0.6)[step - 1])


def test_hard_is_at_or_below_the_mean_ema_and_unseen_is_not_hard():
    algo = build_algorithm("ceeh", {"length_scale": 0.0})
    first = algo.credit(batch(["a", "b"], [[1, 0, 0, 0], [1, 1, 1, 0]]))
    assert first.metrics["ceeh/hard_frac"] == 0.0  # nothing has history at step 1
    # EMAs a 0.25, b 0.75: mean 0.5. a at 0.5 (equal: hard), b at 0.75 (above), c unseen at 0
    second = algo.credit(batch(["a", "b", "c"], [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], step=2))
    assert second.metrics["ceeh/hard_frac"] == pytest.approx(1 / 3)
    # EMAs a 0.8 * 0.25 + 0.2 * 0.5 = 0.3, b 0.75, c 0: mean 0.35. c, seen twice now, is hard
    assert questions(algo)["a"][0] == pytest.approx(0.3)
    third = algo.credit(batch(["c", "b"], [[0, 0, 0, 1], [1, 1, 1, 1]], step=3))
    assert third.metrics["ceeh/hard_frac"] == 0.5
    assert third.metrics["ceeh/questions_seen"] == 3


def test_length_reward_by_hand():
    lengths = torch.tensor([[5, 10, 30, 14], [5, 10, 30, 14], [5, 10, 30, 14]])
    correct = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    shortest = torch.tensor([10.0, math.nan, 10.0], dtype=torch.float64)
    dropped = torch.tensor([False, False, True])
    got = length_rewards(lengths, correct, shortest, dropped, 0.5, -0.9)
    # L* 10: 0.5 (10 - 5) / 10 = 0.25, 0, 0.5 * -2 = -1 -> the floor -0.9; the 4th is incorrect;
    # no L* yet: 0; the question's accuracy dropped: 0
    expected = torch.tensor([[0.25, 0.0, -0.9, 0.0], [0.0] * 4, [0.0] * 4], dtype=torch.float64)
    torch.testing.assert_close(got, expected)


def test_shortest_length_ema_and_the_drop_rule():
    algo = build_algorithm("ceeh", {})
    algo.credit(batch(["q"], [[1, 1, 0, 0]], lengths=[[12, 20, 5, 7]]))
    assert questions(algo)["q"] == [0.5, 12.0]  # the first shortest correct length starts L*
    # accuracy 0.25 < 0.5: dropped, no length reward; a shorter one (8): L* moves by 0.2
    dropped = algo.credit(batch(["q"], [[1, 0, 0, 0]], lengths=[[8, 3, 3, 3]], step=2))
    assert dropped.metrics["ceeh/length_reward_mean"] == 0.0
    assert questions(algo)["q"][1] == pytest.approx(0.8 * 12 + 0.2 * 8)  # 11.2
    # accuracy 0.5 > 0.4875: the length reward, in the reward before the advantage (entropy 0:
    # no bonus). A longer shortest (16): L* moves by 0.05
    credit = algo.credit(batch(["q"], [[1, 1, 0, 0]], lengths=[[16, 28, 4, 4]], step=3))
    bonus = [0.5 * (11.2 - 16) / 11.2, 0.5 * (11.2 - 28) / 11.2, 0.0, 0.0]  # -0.2143, -0.75
    assert credit.metrics["ceeh/length_reward_mean"] == pytest.approx((bonus[0] + bonus[1]) / 2)
    r = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64) + torch.tensor(bonus, dtype=torch.float64)
    a = (r - r.mean()) / (r.std() + 1e-6)
    torch.testing.assert_close(credit.advantages, a.repeat_interleave(torch.tensor([16, 28, 4, 4])).float())
    assert questions(algo)["q"][1] == pytest.approx(0.95 * 11.2 + 0.05 * 16)  # 11.44
    # no correct response: L* stays
    algo.credit(batch(["q"], [[0, 0, 0, 0]], lengths=[[1, 1, 1, 1]], step=4))
    assert questions(algo)["q"][1] == pytest.approx(11.44)


def test_entropy_bonus_on_hard_questions_by_hand():
    algo = build_algorithm("ceeh", {"advantage": "dr_grpo", "anneal_steps": 4})
    algo.load_state_dict({"questions": {"q": [0.9, None], "r": [0.1, None]}})  # mean EMA 0.5
    inputs = batch(
        ["q", "r"],
        [[1, 0], [1, 1]],  # q at 0.5: hard; r at 1.0: not
        rewards=[[1.0, 0.0], [1.0, 0.5]],  # dr_grpo: A = (0.5, -0.5 | 0.25, -0.25)
        lengths=[[2, 1], [1, 1]],
        entropy=[0.5, 2.0, 1.0, 3.0, 3.0],
        step=3,  # s = 0.5 (1 + cos(pi 2 / 4)) = 0.5
    )
    credit = algo.credit(inputs)
    # q: 0.5 min(0.4 H, |A| / 2) = 0.5 min(0.2, 0.25), 0.5 min(0.8, 0.25), 0.5 min(0.4, 0.25)
    expected = torch.tensor([0.5 + 0.1, 0.5 + 0.125, -0.5 + 0.125, 0.25, -0.25])
    torch.testing.assert_close(credit.advantages, expected)
    assert credit.metrics["ceeh/anneal"] == pytest.approx(0.5)
    assert credit.metrics["ceeh/hard_frac"] == 0.5
    assert credit.metrics["ceeh/entropy_bonus_mean"] == pytest.approx((0.1 + 0.125 + 0.125) / 3)
    # A' keeps A's sign; a zero advantage gets no bonus
    a = torch.tensor([1.0, -1.0, 0.0])
    bonus = entropy_bonus(a, torch.tensor([9.0, 9.0, 9.0]), torch.ones(3, dtype=torch.bool), 1.0, 0.4, 0.5)
    torch.testing.assert_close(a + bonus.float(), torch.tensor([1.5, -0.5, 0.0]))
    # anneal_steps null: over the run's steps (CreditInputs.total_steps)
    algo = build_algorithm("ceeh", {"advantage": "dr_grpo"})
    algo.load_state_dict({"questions": {"q": [0.9, None], "r": [0.1, None]}})
    inputs.total_steps = 4
    torch.testing.assert_close(algo.credit(inputs).advantages, expected)


def test_cosine_schedule():
    assert cosine_anneal(1, 10) == 1.0
    assert cosine_anneal(6, 10) == pytest.approx(0.5)
    assert cosine_anneal(3, 4) == pytest.approx(0.5)
    assert cosine_anneal(2, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_anneal(11, 10) == pytest.approx(0.0) and cosine_anneal(50, 10) == pytest.approx(0.0)
    values = [cosine_anneal(s, 10) for s in range(1, 12)]
    assert values == sorted(values, reverse=True)


def test_state_dict_round_trip_repeats_the_next_advantages():
    gen = torch.Generator().manual_seed(0)

    def random_batch(step):
        correct = torch.rand(3, 4, generator=gen) < 0.5
        lengths = torch.randint(1, 6, (3, 4), generator=gen)
        return batch(
            ["a", "b", ["c", "a", "d"][step % 3]],
            correct.tolist(),
            lengths=lengths.tolist(),
            entropy=torch.rand(int(lengths.sum()), generator=gen).tolist(),
            step=step,
        )

    algo = build_algorithm("ceeh", {})
    for step in (1, 2, 3):
        algo.credit(random_batch(step))
    resumed = build_algorithm("ceeh", {})
    resumed.load_state_dict(json.loads(json.dumps(algo.state_dict())))
    fresh = build_algorithm("ceeh", {})
    nxt = random_batch(4)
    expected = algo.credit(nxt)
    got = resumed.credit(nxt)
    assert torch.equal(got.advantages, expected.advantages) and got.metrics == expected.metrics
    assert resumed.state_dict() == algo.state_dict()
    assert not torch.equal(fresh.credit(nxt).advantages, expected.advantages)  # the state matters


@pytest.mark.parametrize(
    "params, key",
    [
        ({"length_floor": 0.5}, "algorithm.length_floor"),
        ({"accuracy_alpha_up": 0.0}, "algorithm.accuracy_alpha_up"),
        ({"length_alpha_shorter": 1.5}, "algorithm.length_alpha_shorter"),
        ({"anneal_steps": 0}, "algorithm.anneal_steps"),
        ({"entropy_weight": -0.4}, "algorithm.entropy_weight"),
        ({"loss_agg": "constant"}, "algorithm.loss_agg"),
        ({"advantage": "gae"}, "algorithm.advantage"),
    ],
)
def test_nonsense_is_refused_in_one_line(params, key):
    with pytest.raises(ConfigError, match=f"key '{key}'") as e:
        build_algorithm("ceeh", params)
    assert "\n" not in str(e.value)


def test_needs_and_streaming_refused():
    needs = build_algorithm("ceeh", {}).needs
    assert needs.credit_entropy and needs.problem_outcomes and needs.logprobs_before_credit
    assert not needs.token_collision and not build_algorithm("grpo", {}).needs.logprobs_before_credit
    tree = {"mode": "inprocess", "algorithm": {"name": "ceeh"}}
    validate_config(TrainConfig, tree, "test.yaml")
    with pytest.raises(ConfigError, match="async_mode 'streaming'"):
        streaming = {"rollout": {"staleness": 1, "async_mode": "streaming"}}
        validate_config(TrainConfig, {**tree, **streaming}, "test.yaml")


@pytest.mark.slow  # about 50 s on 2 shared cores
def test_ceeh_run_resumes_exactly(tmp_path):
    """Four training problems (the warm-up's batch too): step 2 sees step 1's questions again,
    so its credit reads the state the step-1 checkpoint carries."""
    args = ("algorithm.name=ceeh", "task.train_size=4", "warmup.batch_size=4", "save_every=1")
    run = run_train(tmp_path / "full", *args, config=CHAIN)
    metrics = read_metrics(run)
    for step in (1, 2):
        for key in ("hard_frac", "entropy_bonus_mean", "length_reward_mean", "anneal"):
            assert f"ceeh/{key}" in metrics[step], (step, key)
    # s over the run's 2 steps: 1 at step 1, 0.5 (1 + cos(pi / 2)) at step 2
    assert metrics[1]["ceeh/anneal"] == 1.0 and metrics[2]["ceeh/anneal"] == pytest.approx(0.5)
    assert metrics[2]["ceeh/questions_seen"] == 4
    state = json.loads((run / "checkpoints" / "step_1" / "trainer_state.json").read_text())
    assert len(state["algorithm_state"]["questions"]) == 4
    assert_resume_repeats(run, tmp_path, 2)
