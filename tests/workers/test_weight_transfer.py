"""Weight syncs through the transfer group, as a run makes them (rlpost/engines/weight_sync.py).

A learner takes a few large steps; then its weights reach an engine over a real gloo group
(the learner as rank 0 here, the engine receiving in a thread: two ranks of one group
meet in the same collectives as two processes do), in buckets smaller than one tensor,
under full fine-tuning, ZeRO-3 and LoRA, as bytes or as shared-memory handles (the IPC
transport); or handed over in this process (the in-process mode's transport). Whole Ray
runs through both transports: tests/runs/test_weight_transports.py. After a sync the
engine's log-probs of fixed sequences equal the learner's within 1e-5 and have moved by
far more. Plus the plan, the packing, and the
checks that make a mismatch an error.
"""

from __future__ import annotations

import threading

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.config.rl import TrainConfig
from rlpost.config.sections import ModelConfig
from rlpost.data.batch import Sample, view
from rlpost.engines.base import Completion
from rlpost.engines.weight_sync import (
    Receiver,
    SyncPlan,
    TensorSpec,
    TransferGroup,
    WeightSyncError,
    header,
    pack,
    unpack,
)
from rlpost.jobs.weights import WeightSync
from rlpost.model.load import materialise_initial_model
from rlpost.workers.group import WorkerGroup, free_port
from rlpost.workers.learner import Learner, LRSchedule
from rlpost.workers.rollout import RolloutWorker

TOL = 1e-5
BUCKET = 48 * 1024  # bytes: several buckets, and the embeddings (12 x 128 fp32 = 6 KiB) share one


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return materialise_initial_model(
        ModelConfig(hidden_size=128, intermediate_size=256),
        "0123456789+=",
        seed=0,
        out_dir=tmp_path_factory.mktemp("m"),
        max_len=64,
    )


def fixed_samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for p_len, r_len in [(5, 3), (7, 4), (4, 6), (6, 2)]:
        ids = torch.randint(3, 15, (p_len + r_len,), generator=g).tolist()
        samples.append(
            Sample(
                prompt_ids=[1] + ids[:p_len],
                response_ids=ids[p_len:],
                advantages=torch.full((r_len,), 1.0 if r_len % 2 else -1.0),
            )
        )
    return samples


def trained_learner(model_dir, engine: str = "hf", **learner) -> Learner:
    cfg = TrainConfig(mode="inprocess", learner=learner, rollout={"engine": engine})
    out = Learner(cfg, str(model_dir), ("sft", {}), LRSchedule(1e-2), rank=0, world_size=1, pad_id=0)
    out.setup(*out.rendezvous())
    samples = fixed_samples()
    weights = build_algorithm("sft", {}).token_weights(view(samples))
    for s, w in zip(samples, weights.split([s.num_tokens for s in samples])):
        s.weights = w
    for _ in range(5):
        out.train_minibatch([samples])
    return out


def in_thread(fn, *args):
    """Run `fn` in a thread; returns a join() that gives its result or raises its error."""
    box = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised by join
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()

    def join():
        thread.join(timeout=120)
        if "error" in box:
            raise box["error"]
        return box.get("result")

    return join


def sync_over_gloo(learner: Learner, worker: RolloutWorker, ipc: bool) -> int:
    """Open a transfer group of the learner (rank 0) and the worker's engine, then sync."""
    plan = learner.weight_plan("float32", BUCKET)
    address, port = "127.0.0.1", free_port()
    opened = in_thread(worker.open_weights, plan, address, port, 1, 2, 60.0, ipc)
    learner.connect_weights(address, port, 2, 60.0, ipc)
    opened()
    received = in_thread(worker.receive_weights)
    sent = learner.send_weights()
    assert received() == sent
    return sent


def assert_engine_matches(learner: Learner, worker: RolloutWorker, before: list[list[float]]) -> None:
    samples = fixed_samples()
    learner_logp = learner.logprobs([samples])["logp"].split([s.num_tokens for s in samples])
    after = worker.sequence_logprobs([s.prompt_ids + s.response_ids for s in samples])
    moved = 0.0
    for s, lp, b, a in zip(samples, learner_logp, before, after):
        r = s.num_tokens
        torch.testing.assert_close(torch.tensor(a[-r:]), lp, rtol=0, atol=TOL)
        moved = max(moved, (torch.tensor(b[-r:]) - lp).abs().max().item())
    assert moved > 100 * TOL


SETUPS = {
    "full": {},
    "zero3": {"zero_stage": 3},
    "lora": {"lora": {"r": 4, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj"]}},
}


@pytest.mark.parametrize(
    "engine,setup,ipc",
    [
        ("hf", "full", False),
        ("hf", "zero3", False),
        ("hf", "lora", False),
        ("hf", "full", True),  # handles to shared memory, over gloo
        ("hf", "zero3", True),
        pytest.param("vllm", "lora", False, marks=pytest.mark.slow),
        pytest.param("vllm", "zero3", True, marks=pytest.mark.slow),
    ],
)
def test_sync_over_a_group_matches_the_learner(model_dir, engine, setup, ipc):
    learner = trained_learner(model_dir, engine, **SETUPS[setup])
    worker = RolloutWorker(str(model_dir), learner.cfg.rollout, "float32", seed=0, rank=0)
    try:
        before = worker.sequence_logprobs([s.prompt_ids + s.response_ids for s in fixed_samples()])
        version = sync_over_gloo(learner, worker, ipc)
        assert len(learner.sender.plan.buckets) > 3  # the weights really travel in buckets
        assert version == 5  # optimizer steps taken
        assert_engine_matches(learner, worker, before)
        # a sampled completion carries the version back
        (group,) = worker.generate([[1, 3, 4]], 2, 1.0, 1.0, 4, seed=0)
        assert [c.weight_version for c in group] == [5, 5]
    finally:
        worker.shutdown()
        learner.shutdown()


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_a_whole_state_dict_loads_as_the_learner_holds_it(model_dir, engine):
    """`update_weights(state_dict)`, what tests and benchmarks use (a run syncs buckets)."""
    learner = trained_learner(model_dir, engine)
    worker = RolloutWorker(str(model_dir), learner.cfg.rollout, "float32", seed=0, rank=0)
    try:
        before = worker.sequence_logprobs([s.prompt_ids + s.response_ids for s in fixed_samples()])
        worker.update_weights(learner.export_weights())
        assert_engine_matches(learner, worker, before)
    finally:
        worker.shutdown()
        learner.shutdown()


def test_in_process_transport_matches_the_learner(model_dir):
    learner = trained_learner(model_dir, **SETUPS["lora"])
    cfg = learner.cfg
    worker = RolloutWorker(str(model_dir), cfg.rollout, "float32", seed=0, rank=0)
    learners = WorkerGroup(Learner, 0, dict, use_ray=False)
    rollout = WorkerGroup(RolloutWorker, 0, dict, use_ray=False)
    learners.workers, rollout.workers = [learner], [worker]  # started above, already trained
    try:
        before = worker.sequence_logprobs([s.prompt_ids + s.response_ids for s in fixed_samples()])
        sync = WeightSync(cfg, learners, rollout, use_ray=False)
        assert sync.sync() == 5
        assert_engine_matches(learner, worker, before)
        # a planted stale engine: its rollouts are refused
        worker.engine.weight_version = 4
        completions = worker.generate([[1, 3, 4]], 2, 1.0, 1.0, 4, seed=0)
        with pytest.raises(
            WeightSyncError, match=r"version\(s\) \[4\].*sampled with version 5 \(the latest sync sent 5\)"
        ):
            sync.check_rollouts(completions)
    finally:
        worker.shutdown()
        learner.shutdown()


def test_plan_cuts_buckets_in_order_and_packing_round_trips():
    specs = [
        TensorSpec("a", (3, 5), "float32"),
        TensorSpec("b", (7,), "bfloat16"),
        TensorSpec("c", (40,), "float32"),
    ]
    plan = SyncPlan.cut(specs, bucket_bytes=96)
    # a: 60 bytes -> 64 aligned; b: 14 -> 16 (80 in all); c: 160, over the limit, alone
    assert [[s.name for s in b] for b in plan.buckets] == [["a", "b"], ["c"]]
    assert [plan.bucket_bytes(b) for b in plan.buckets] == [80, 160]
    again = SyncPlan.from_list(plan.to_list())
    assert again == plan and again.digest() == plan.digest()
    a, b = torch.randn(3, 5), torch.randn(7, dtype=torch.float64)
    buf = pack(plan.buckets[0], [a, b], torch.empty(80, dtype=torch.uint8))
    (na, ua), (nb, ub) = unpack(plan.buckets[0], buf)
    assert (na, nb) == ("a", "b")
    assert torch.equal(ua, a)
    assert ub.dtype == torch.bfloat16 and torch.equal(ub, b.to(torch.bfloat16))  # cast by the copy


def test_a_header_from_another_plan_is_refused():
    plan = SyncPlan.cut([TensorSpec("w", (4,), "float32")], 64)
    other = SyncPlan.cut([TensorSpec("w", (4,), "bfloat16")], 64)
    port = free_port()
    receiver = Receiver(plan, torch.device("cpu"), lambda tensors: None, "engine 0", load_keeps=False)
    joined = in_thread(receiver.connect, "127.0.0.1", port, 1, 2, 30.0)
    sender = TransferGroup("127.0.0.1", port, 0, 2, torch.device("cpu"), 30.0)
    joined()
    received = in_thread(receiver.receive)
    sender.broadcast(header(3, other, sender.wire))
    with pytest.raises(WeightSyncError, match="engine 0: the learner's weight plan"):
        received()
    assert receiver.version == 0  # nothing was taken for loaded


def test_engines_reporting_another_version_fail_the_sync(monkeypatch):
    class Group:  # a worker group whose calls return `results`
        def __init__(self, results):
            self.results = results

        def submit(self, method, *args, **kwargs):
            return self.results

    monkeypatch.setattr("rlpost.jobs.weights.gather", lambda refs: refs)
    sync = WeightSync.__new__(WeightSync)
    sync.use_ray, sync.version = True, 0
    sync.learners, sync.rollout = Group([7, 7]), Group([7, 6])
    with pytest.raises(WeightSyncError, match=r"sent weight version 7, but rollout worker\(s\) 1 loaded 6"):
        sync.sync()


def test_logprob_gap_alarm():
    sync = WeightSync.__new__(WeightSync)
    sync.wc = TrainConfig().rollout.weight_sync
    sync.check_gap({"logprob_gap/rollout_vs_learner_mean": 0.9}, step=3)
    with pytest.raises(WeightSyncError, match="step 3: .* 1.5 nats per token, over rollout.weight_sync"):
        sync.check_gap({"logprob_gap/rollout_vs_learner_mean": 1.5}, step=3)
    sync.wc = sync.wc.model_copy(update={"max_logprob_gap": None})
    sync.check_gap({"logprob_gap/rollout_vs_learner_mean": 50.0}, step=3)


def test_completion_version_defaults_to_the_initial_weights():
    assert Completion([1], [0.0], False).weight_version == 0
