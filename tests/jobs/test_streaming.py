"""Streaming generation: the feeder's work and limits, partial rollouts, and a planted lag
beyond rollout.staleness dropped and counted (rlpost/jobs/streaming.py)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from rlpost.data.stream import EpochStream
from rlpost.engines.base import Completion
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config
from rlpost.jobs.rl import step_metrics
from rlpost.jobs.streaming import Response, StreamGroup, Streaming
from rlpost.rewards.scoring.pool import RewardResult
from rlpost.tracking.metrics import MetricSums
from tests.run_helpers import TINY, read_metrics, run_train


class ScriptedWorker:
    """Each response gets `per_call` tokens (7s) per call, ending with EOS (1) once it has
    `length` tokens; every token's log-prob is the engine's weight version."""

    def __init__(self, length: int, per_call: int | None = None):
        self.length, self.per_call, self.version, self.calls = length, per_call, 0, []

    def generate_timed(self, prompts, n, temperature, top_p, max_new_tokens, seed):
        self.calls.append((len(prompts), n, max_new_tokens))
        out = []
        for p in prompts:
            done = len(p) - 1  # prompts are [0] + the response so far
            group = []
            for _ in range(n):
                k = min(max_new_tokens, self.per_call or max_new_tokens, self.length - done)
                ids = [7] * (k - 1) + [1 if done + k == self.length else 7]
                ended = ids[-1] == 1
                group.append(Completion(ids, [float(self.version)] * k, not ended, self.version))
            out.append(group)
        return out, 0.5


class Rollout(list):
    """A rollout group stand-in that len() works on."""


def fake_trainer(*overrides: str, worker: ScriptedWorker):
    cfg = load_config(TINY, ["rollout.staleness=1", "rollout.async_mode=streaming", *overrides])
    versions = {0: 0}  # weight version -> the step after which it was sent

    def score(responses, problems):
        zeros = [0.0] * len(responses)
        return RewardResult(zeros, {"task": zeros}, {"raised": 0, "timed_out": 0}, None)

    rollout = Rollout([worker])
    rollout.workers = [worker]
    return SimpleNamespace(
        cfg=cfg,
        use_ray=False,
        rollout=rollout,
        stream=EpochStream(64, 0),
        train_problems=[SimpleNamespace(prompt=str(i)) for i in range(64)],
        encode_prompt=lambda prompt: [0],
        sampling_rule=None,
        algorithm=SimpleNamespace(sampling_rule=lambda entropy: None),
        weights=SimpleNamespace(
            lag=lambda step, v: None if v not in versions else step - 1 - versions[v], steps=versions
        ),
        score=score,
        tracker=None,
    )


def make(*overrides: str, worker: ScriptedWorker) -> Streaming:
    return Streaming(fake_trainer(*overrides, worker=worker))


def test_partial_rollouts_continue_from_the_prefix_with_the_new_weights():
    worker = ScriptedWorker(length=3, per_call=1)
    feeder = make("rollout.stream.partial=true", "rollout.stream.segment_tokens=1", worker=worker).feeder
    feeder.pump()  # the first token of 4 prompts x 4 samples
    assert worker.calls == [(4, 4, 1)] and feeder.finished.empty() and len(feeder.todo) == 16
    worker.version = 5  # a weight update between segments
    feeder.pump()
    feeder.pump()
    assert worker.calls[1:] == [(16, 1, 1), (16, 1, 1)]  # continuations: one sample per prefix
    groups = [feeder.finished.get() for _ in range(4)]
    r = groups[0].responses[0]
    assert r.ids == [7, 7, 1] and not r.truncated
    assert r.logprobs == [0.0, 5.0, 5.0]  # each token's log-prob from the weights that sampled it
    assert r.version == 0  # its lag is that of its first token


def test_a_response_at_the_length_limit_is_truncated_and_finished():
    worker = ScriptedWorker(length=10)
    feeder = make("rollout.stream.partial=true", "rollout.stream.segment_tokens=2", worker=worker).feeder
    feeder.pump()
    feeder.pump()  # max_new_tokens is 3: 2 tokens, then 1
    assert worker.calls == [(4, 4, 2), (16, 1, 1)]
    r = feeder.finished.get().responses[0]
    assert len(r.ids) == 3 and r.truncated and r.done


@pytest.mark.parametrize("too_stale, after_take", [("drop", 12), ("wait", 8)])
def test_the_feeder_runs_at_most_so_far_ahead(too_stale, after_take):
    """k = 1, 4 prompts a step. `drop` keeps the engines busy up to k + 1 batches ahead of
    the learners; `wait` starts only groups the learners can still take within lag k of
    the weights the engines were last sent."""
    feeder = make(f"rollout.stream.too_stale={too_stale}", worker=ScriptedWorker(length=2)).feeder
    for _ in range(5):
        feeder.pump()
    assert feeder.started == 8  # batches 1 and 2 on the starting weights: lags 0 and 1
    feeder.settled, feeder.taken_steps = 4, 1  # step 1 took its batch and trains
    feeder.pump()
    # sampled on the starting weights, a third batch would train at step 3 with lag 2
    assert feeder.started == after_take
    feeder.synced_step = 1  # step 1's update reached the engines
    feeder.pump()
    assert feeder.started == 12


def test_a_planted_lag_beyond_staleness_is_dropped_and_counted():
    streaming = make(worker=ScriptedWorker(length=2))
    trainer, feeder = streaming.trainer, streaming.feeder
    trainer.weights.steps.update({3: 1, 6: 2})  # versions 3 and 6 were sent after steps 1, 2
    for version in (0, 3, 6, 6, 6, 6):  # at step 3: lags 2, 1, 0, 0, 0, 0
        responses = [Response([7, 1], [0.0, 0.0], version, done=True) for _ in range(4)]
        feeder.finished.put(StreamGroup(0, [0], responses))
        feeder.started += 1
    out = streaming.collect(3, {"rollout": 0.0, "reward": 0.0})
    assert out.stale_samples == 4  # the lag-2 group, over k = 1
    assert out.lags == [1] * 4 + [0] * 12
    assert [s.weight_version for g in out.groups for s in g] == [3] * 4 + [6] * 12
    assert [s.group for g in out.groups for s in g] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert feeder.settled == 5 and len(streaming.waiting) == 1  # one group left for step 4


def test_streaming_refuses_a_per_token_sampling_rule():
    trainer = fake_trainer(worker=ScriptedWorker(length=2))
    trainer.algorithm = SimpleNamespace(sampling_rule=lambda entropy: object())  # HAPO's tau > 0
    with pytest.raises(ConfigError, match="async_mode=deterministic"):
        Streaming(trainer)


def test_a_full_batch_waiting_is_taken_without_generating():
    worker = ScriptedWorker(length=2)
    streaming = make("rollout.stream.chunk_prompts=8", worker=worker)
    streaming.collect(1, {"rollout": 0.0, "reward": 0.0})  # one chunk of 8 groups: 4 left over
    assert len(worker.calls) == 1 and len(streaming.waiting) == 4
    times = {"rollout": 0.0, "reward": 0.0}
    out = streaming.collect(2, times)
    assert len(worker.calls) == 1 and len(out.groups) == 4 and not streaming.waiting
    # nothing was scored in step 2: its metrics have no rewards or lengths, and no error
    metrics = step_metrics(streaming.trainer.cfg, out, [], None, MetricSums(), {**times, "update": 1.0}, {})
    assert "reward/mean" not in metrics and metrics["tokens"] == 0


@pytest.mark.slow
def test_a_streaming_run_on_ray_with_partial_rollouts_trains_and_resumes(tmp_path):
    overrides = (
        "mode=ray",
        "rollout.staleness=1",
        "rollout.async_mode=streaming",
        "rollout.stream.partial=true",
        "rollout.stream.segment_tokens=1",
        "steps=4",
        "save_every=2",
    )
    run = run_train(tmp_path / "run", *overrides)
    metrics = read_metrics(run)
    for step in range(1, 5):
        assert metrics[step]["staleness/lag_max"] <= 1
        assert "staleness/dropped_samples" in metrics[step]
    assert (run / "checkpoints" / "step_2" / "stream_state.pt").is_file()
    for later in ("checkpoints/step_4", "final_model"):
        shutil.rmtree(run / later)
    assert run_train(tmp_path / "run", *overrides, f"resume={run}") == run
    assert sorted(read_metrics(run)) == [0, 1, 2, 3, 4]
