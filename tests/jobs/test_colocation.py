"""The order in which an RL step puts vLLM engines to sleep, moves the learners' optimizer
state and wakes the engines (rlpost/jobs/colocation.py), through the real `Trainer.rl_step`
with recording fakes for the two worker groups, the generation, the update and the sync;
and the check that refuses sleep mode where vLLM has none (rlpost/jobs/preflight.py).

vLLM's sleep mode does not exist on the CPU build and no GPU ran these calls: the engines'
and learners' own methods are thin calls of vLLM's and DeepSpeed's documented APIs, and the
DeepSpeed half runs for real on CPU in tests/workers/test_offload.py."""

from __future__ import annotations

import sys

import pytest
import torch

from rlpost.config.load import read_train_config
from rlpost.data.batch import Sample
from rlpost.errors import ConfigError
from rlpost.jobs import rl
from rlpost.jobs.colocation import Colocation
from rlpost.jobs.preflight import load_config
from rlpost.jobs.rl import Rollouts, Trainer

SMALL = [
    "mode=inprocess",
    "task.train_size=16",
    "task.eval_size=4",
    "rollout.prompts_per_step=1",
    "rollout.n=2",
    "learner.mini_batch_size=2",
]

GENERATE, UPDATE, SYNC, LOGPROBS = ("generate",), ("update",), ("sync",), ("logprobs",)
SLEEP = [("rollout", "sleep", 2)]
RELOAD = [("learners", "reload_optimizer")]
OFFLOAD = [("learners", "offload_optimizer")]
WAKE_WEIGHTS = [("rollout", "wake_up", ["weights"])]
WAKE_KV = [("rollout", "wake_up", ["kv_cache"])]


class RecordingGroup:
    """A worker group of two that logs every call; engines report fully awake unless told."""

    def __init__(self, name: str, log: list, awake: bool = True):
        self.name, self.log, self.awake = name, log, awake

    def __len__(self) -> int:
        return 2

    def call(self, method: str, *args, per_rank=None, **kwargs):
        self.log.append((self.name, method, *args))
        return [self.awake if method == "wake_up" else None] * 2


def trainer(tmp_path, monkeypatch, overrides: list[str], groups: int = 1):
    """A Trainer whose rl_step runs for real between fakes that append to `log`."""
    cfg = read_train_config(None, [*SMALL, *overrides])
    t = Trainer(cfg, tmp_path)
    log: list = []
    t.learners, t.rollout = RecordingGroup("learners", log), RecordingGroup("rollout", log)

    def collect(step, times):
        log.append(GENERATE)
        made = [[Sample(prompt_ids=[1], response_ids=[2, 3], reward=r) for r in (0.0, 1.0)]][:groups]
        return Rollouts(groups=made, generated=[s for g in made for s in g])

    def score_and_train(learners, algorithm, batches, split, with_ref):
        log.append(UPDATE)
        return [], {id(s): torch.zeros(s.num_tokens) for mb in batches for s in mb}

    def logprob_pass(learners, algorithm, samples, split, rule, batch_metrics, collision=False):
        log.append(LOGPROBS)
        return {"entropy": torch.zeros(sum(s.num_tokens for s in samples))}

    def train_minibatches(learners, algorithm, batches, split):
        log.append(UPDATE)
        return []

    monkeypatch.setattr(t, "collect", collect)
    monkeypatch.setattr(t, "sync_weights", lambda step: log.append(SYNC))
    monkeypatch.setattr(rl, "score_and_train", score_and_train)
    monkeypatch.setattr(rl, "logprob_pass", logprob_pass)
    monkeypatch.setattr(rl, "train_minibatches", train_minibatches)
    # the step's times, in place of its metrics (whose inputs the fakes do not make)
    monkeypatch.setattr(rl, "step_metrics", lambda cfg, ro, samples, ent, upd, times, bm: dict(times))
    return t, log


VLLM_SLEEP = ["rollout.engine=vllm", "rollout.vllm.sleep_level=2"]
OFFLOAD_ON = ["learner.offload_optimizer=true"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            [*VLLM_SLEEP, *OFFLOAD_ON],
            [GENERATE, *SLEEP, *RELOAD, UPDATE, *OFFLOAD, *WAKE_WEIGHTS, SYNC, *WAKE_KV],
        ),
        ([*VLLM_SLEEP], [GENERATE, *SLEEP, UPDATE, *WAKE_WEIGHTS, SYNC, *WAKE_KV]),
        ([*OFFLOAD_ON], [GENERATE, *RELOAD, UPDATE, *OFFLOAD, SYNC]),
        (["rollout.engine=vllm"], [GENERATE, UPDATE, SYNC]),  # both off: no group is called
        (
            # the log-prob pass before the update (two epochs) runs on the learners while the
            # engines sleep
            [*VLLM_SLEEP, *OFFLOAD_ON, "learner.epochs=2"],
            [GENERATE, *SLEEP, *RELOAD, LOGPROBS, UPDATE, *OFFLOAD, *WAKE_WEIGHTS, SYNC, *WAKE_KV],
        ),
    ],
)
def test_one_step_in_order_and_the_next_generates_awake(tmp_path, monkeypatch, overrides, expected):
    t, log = trainer(tmp_path, monkeypatch, overrides)
    times = t.rl_step(1)
    assert log == expected
    assert ("colocation" in times) == (expected != [GENERATE, UPDATE, SYNC])
    log.clear()
    t.rl_step(2)  # the engines woke fully at the end of step 1: generation comes first again
    assert log == expected


def test_sleep_level_one_is_passed_through(tmp_path, monkeypatch):
    t, log = trainer(tmp_path, monkeypatch, ["rollout.engine=vllm", "rollout.vllm.sleep_level=1"])
    t.rl_step(1)
    assert ("rollout", "sleep", 1) in log


def test_a_step_that_trains_on_nothing_leaves_the_engines_awake(tmp_path, monkeypatch):
    # dynamic sampling kept no group: no update, no sync, no sleep
    t, log = trainer(tmp_path, monkeypatch, [*VLLM_SLEEP, *OFFLOAD_ON], groups=0)
    t.rl_step(1)
    assert log == [GENERATE]


def test_an_engine_left_asleep_stops_the_job(tmp_path):
    cfg = read_train_config(None, [*SMALL, *VLLM_SLEEP])
    log: list = []
    colocation = Colocation(cfg, RecordingGroup("learners", log), RecordingGroup("rollout", log, awake=False))
    colocation.before_update()
    colocation.after_update()
    with pytest.raises(RuntimeError, match="still asleep"):
        colocation.after_sync({})


# ----- the capability check before start-up ---------------------------------------------
SLEEPING_RUN = ["rollout.engine=vllm", "ray.placement=colocated", "rollout.vllm.sleep_level=1"]


def test_sleep_mode_refused_where_vllm_has_none():
    platforms = pytest.importorskip("vllm.platforms")
    if platforms.current_platform.is_sleep_mode_available():
        pytest.skip("this machine's vLLM has sleep mode")
    with pytest.raises(ConfigError) as e:
        load_config(None, SLEEPING_RUN)
    message = str(e.value)
    assert message.startswith("<defaults> (with overrides): key 'rollout.vllm.sleep_level': 1 needs")
    assert type(platforms.current_platform).__name__ in message and "\n" not in message


def test_sleep_mode_accepted_where_vllm_has_it(monkeypatch):
    platforms = pytest.importorskip("vllm.platforms")
    monkeypatch.setattr(type(platforms.current_platform), "is_sleep_mode_available", lambda self: True)
    assert load_config(None, SLEEPING_RUN).rollout.vllm.sleep_level == 1


def test_vllm_is_imported_only_for_sleep_mode(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm.platforms", None)  # any import of it raises
    load_config(None, ["rollout.engine=vllm", "ray.placement=colocated"])
    with pytest.raises(ConfigError, match="vllm is not installed"):
        load_config(None, SLEEPING_RUN)
