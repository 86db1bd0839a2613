"""DAPO pieces (docs/algorithms.md section 1, "DAPO pieces"): the overlong penalty and the
zero-variance filter against hand-computed numbers, and the trainer's dynamic-sampling
bookkeeping (rounds, data position, seeds, metrics) with a scripted rollout engine."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from rlpost.algorithms.dapo import informative_groups, overlong_penalty
from rlpost.data.stream import derive_seed
from rlpost.engines.base import Completion
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config
from rlpost.jobs.rl import Trainer, step_metrics
from rlpost.rewards.scoring.pool import RewardResult
from rlpost.tracking.metrics import MetricSums
from tests.run_helpers import TINY


def test_overlong_penalty_numbers_at_the_boundaries():
    # L_max = 10, L_c = 4: free up to 6, then (6 - |y|) / 4 down to -1 at 10, -1 beyond
    lengths = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 30])
    expected = torch.tensor([0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4), expected)
    # L_c = L_max: the ramp starts at 0 tokens
    torch.testing.assert_close(
        overlong_penalty(torch.tensor([0, 1, 5, 6]), 5, 5),
        torch.tensor([0.0, -0.2, -1.0, -1.0], dtype=torch.float64),
    )
    for buffer, limit in ((0, 10), (11, 10)):
        with pytest.raises(ValueError, match="buffer"):
            overlong_penalty(lengths, limit, buffer)


def test_informative_groups():
    rewards = torch.tensor(
        [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, -0.25]]
    )
    assert informative_groups(rewards).tolist() == [False, True, False, False, True]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.overlong_max_length=6"], "rollout.overlong_buffer is 0"),
        (["rollout.overlong_buffer=4"], r"must not exceed L_max .* \(3\)"),
        (["rollout.overlong_buffer=4", "rollout.overlong_max_length=3"], r"\(3\)"),
        (["rollout.max_extra_rounds=-1"], "key 'rollout.max_extra_rounds'"),
        (["rollout.dynamic_sampling=maybe"], "key 'rollout.dynamic_sampling'"),
    ],
)
def test_rollout_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_overlong_limit_defaults_to_max_new_tokens():
    assert load_config(TINY, ["rollout.overlong_buffer=2"]).rollout.overlong_limit == 3
    cfg = load_config(TINY, ["rollout.overlong_buffer=2", "rollout.overlong_max_length=5"])
    assert cfg.rollout.overlong_limit == 5


# ----------------------------------------------------------------------------- the trainer

# Per generation round, per prompt: (task score, response length) of its 4 completions.
ROUNDS = [
    [[(1, 1)] * 4, [(0, 1), (1, 1), (0, 1), (0, 1)], [(0, 2)] * 4, [(1, 1), (0, 3), (1, 1), (0, 1)]],
    [[(0, 1)] * 4, [(0, 1)] * 4, [(1, 1)] * 4, [(0, 1)] * 4],
    [
        [(1, 1), (0, 1), (0, 1), (0, 1)],
        [(0, 1), (1, 2), (1, 1), (1, 1)],
        [(1, 1), (1, 1), (0, 1), (0, 1)],
        [(0, 1)] * 4,
    ],
]


class ScriptedTrainer(Trainer):
    """The real bookkeeping around a scripted engine and verifier: a completion's first
    token is its task score (2 for 0), its length the scripted length."""

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        self.seeds: list[int] = []
        self.lines: list[str] = []
        self.tracker = self

    def print_line(self, text: str) -> None:
        self.lines.append(text)

    def plot(self) -> None:
        pass

    def generate(self, problems, n, temperature, seed, rule=None):
        script = ROUNDS[len(self.seeds) % len(ROUNDS)]
        self.seeds.append(seed)
        return [
            [
                Completion(
                    ids=[1 if score else 2] + [7] * (length - 1),
                    logprobs=[0.0] * length,
                    truncated=length == 3,
                )
                for score, length in group
            ]
            for group in script
        ]

    def submit_generation(self, problems, n, temperature, seed, rule=None):
        return [self.generate(problems, n, temperature, seed, rule)]

    def encode_prompt(self, text):
        return [1]

    def score(self, responses, problems):
        scores = [float(r[0] == 1) for r in responses]
        return RewardResult(scores, {"task": scores}, {"raised": 0, "timed_out": 0}, None)


def scripted(tmp_path, *overrides: str) -> ScriptedTrainer:
    return ScriptedTrainer(load_config(TINY, list(overrides)), tmp_path)


def collect(trainer: ScriptedTrainer, step: int, times: dict | None = None):
    """Batch `step`'s rollouts, as the loop collects them there (nothing sent ahead)."""
    trainer.generation.next_step = trainer.generation.last_step = step
    return trainer.collect(step, {"rollout": 0.0, "reward": 0.0} if times is None else times)


def test_dynamic_sampling_refills_up_to_the_batch(tmp_path):
    trainer = scripted(tmp_path, "rollout.dynamic_sampling=true", "rollout.max_extra_rounds=3")
    times = {"rollout": 0.0, "reward": 0.0}
    rollouts = collect(trainer, 5, times)
    # round 0 keeps prompts 1 and 3, round 1 nothing, round 2 prompts 0, 1 and 2, of which
    # the batch takes the first 2; zero-variance groups dropped: 2 + 4 + 1 = 7 of 12
    assert rollouts.rounds == 3 and rollouts.dropped_groups == 7
    assert [[s.reward for s in g] for g in rollouts.groups] == [
        [0, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 0, 0, 0],
        [0, 1, 1, 1],
    ]
    assert [s.group for g in rollouts.groups for s in g] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert len(rollouts.generated) == 48 and trainer.stream.position == 12
    assert trainer.seeds == [
        derive_seed(3, "rollout", 5),
        derive_seed(3, "rollout", 5, "round", 1),
        derive_seed(3, "rollout", 5, "round", 2),
    ]
    assert trainer.lines == []
    metrics = step_metrics(trainer.cfg, rollouts, [], None, MetricSums(), times, {})
    assert metrics["dynamic_sampling/dropped_group_frac"] == pytest.approx(7 / 12)
    assert metrics["dynamic_sampling/extra_rounds"] == 2
    assert metrics["dynamic_sampling/kept_groups"] == 4
    # over all 48 generated samples: 4 + 1 + 2 (round 0) + 4 (round 1) + 1 + 3 + 2 (round 2)
    assert metrics["accuracy/arithmetic"] == pytest.approx(17 / 48)


def test_dynamic_sampling_gives_up_after_the_bound(tmp_path):
    trainer = scripted(tmp_path, "rollout.dynamic_sampling=true", "rollout.max_extra_rounds=1")
    rollouts = collect(trainer, 1)
    assert rollouts.rounds == 2 and len(rollouts.groups) == 2 and trainer.stream.position == 8
    assert trainer.lines == [
        "step 1: dynamic sampling kept 2 of 4 groups after 1 extra rounds; training on those"
    ]


def test_without_dynamic_sampling_one_round_as_before(tmp_path):
    trainer = scripted(tmp_path)
    rollouts = collect(trainer, 2)
    assert rollouts.rounds == 1 and len(rollouts.groups) == 4 and trainer.stream.position == 4
    assert trainer.seeds == [derive_seed(3, "rollout", 2)]
    metrics = step_metrics(trainer.cfg, rollouts, [], None, MetricSums(), {"rollout": 1.0}, {})
    assert not any(k.startswith(("dynamic_sampling/", "overlong/")) for k in metrics)


def test_overlong_shaping_adds_to_the_reward_and_makes_groups_informative(tmp_path):
    # max_new_tokens 3, L_c = 2: free up to 1 token, -0.5 at 2, -1 at 3
    trainer = scripted(
        tmp_path, "rollout.dynamic_sampling=true", "rollout.overlong_buffer=2", "rollout.max_extra_rounds=0"
    )
    rollouts = collect(trainer, 1)
    # round 0: prompt 2 (all wrong, all 2 tokens) stays uninformative at -0.5 each;
    # prompt 3 had (1, 1), (0, 3), (1, 1), (0, 1): rewards 1, -1, 1, 0
    assert [[s.reward for s in g] for g in rollouts.groups] == [[0, 1, 0, 0], [1, -1, 1, 0]]
    assert rollouts.rewards.totals[8:12] == [0, 0, 0, 0]  # the pool rewards stay unshaped
    metrics = step_metrics(trainer.cfg, rollouts, [], None, MetricSums(), {"rollout": 1.0}, {})
    # penalties: 4 x -0.5 (prompt 2) and one -1 (prompt 3) over 16 samples
    assert metrics["overlong/penalty_mean"] == pytest.approx(-3 / 16)
    assert metrics["accuracy/arithmetic"] == pytest.approx(7 / 16)
    assert metrics["reward/mean"] == pytest.approx((7 - 3) / 16)


def test_prompt_stream_position_crosses_epochs_and_survives_a_checkpoint(tmp_path):
    trainer = scripted(tmp_path)
    size = len(trainer.train_problems)  # 64
    trainer.take_prompts(size - 4)
    crossing = trainer.take_prompts(8)
    assert crossing[:4] == [trainer.train_problems[i] for i in trainer.stream.order(0)[-4:]]
    assert crossing[4:] == [trainer.train_problems[i] for i in trainer.stream.order(1)[:4]]

    class Learners:  # writes the directory the learner checkpoint would
        def call(self, method, ckpt_dir=None, tag=None):
            if method == "save_checkpoint":
                (tmp_path / "checkpoints" / tag).mkdir(parents=True)

    weights = SimpleNamespace(steps={0: 0}, recent_steps=lambda count: {0: 0})
    trainer.learners, trainer.sync_weights, trainer.weights = Learners(), lambda step: None, weights
    trainer.save_checkpoint(3)
    state = json.loads((tmp_path / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["data_position"] == size + 4
    resumed = scripted(tmp_path)
    resumed.learners, resumed.sync_weights, resumed.weights = Learners(), lambda step: None, weights
    resumed.load_checkpoint("step_3", state)
    assert resumed.take_prompts(4) == trainer.take_prompts(4)
