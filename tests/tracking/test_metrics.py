"""MetricSums: exact reductions over micro-batches and ranks, with tensor values read late."""

from __future__ import annotations

import pickle

import pytest
import torch

from rlpost.tracking.metrics import MetricSums


def test_token_means_totals_and_extremes_by_hand():
    m = MetricSums()
    m.add_tokens("entropy", torch.tensor([1.0, 2.0, 3.0]))
    m.add_tokens("entropy", torch.tensor([6.0]))
    m.add_tokens("ratio_max", torch.tensor([1.5, 0.5]))
    m.add_tokens("ratio_max", torch.tensor([1.25]))
    m.add_tokens("ratio_min", torch.tensor([0.75, 0.9]))
    m.add_tokens("entropy", torch.tensor([]))  # an empty micro-batch changes nothing
    m.add_total("loss", torch.tensor(0.25, dtype=torch.float64))
    m.add_total("loss", 0.5)
    m.add_mean("lr", 1e-3)
    assert m.result() == {
        "entropy": pytest.approx(3.0),
        "ratio_max": 1.5,
        "ratio_min": 0.75,
        "loss": 0.75,
        "lr": 1e-3,
    }


def test_merging_two_ranks_equals_one_rank_with_all_tokens():
    values = torch.tensor([0.5, -1.0, 2.0, 4.0, 0.125])
    whole, a, b = MetricSums(), MetricSums(), MetricSums()
    whole.add_tokens("x", values)
    whole.add_tokens("x_max", values)
    a.add_tokens("x", values[:2])
    a.add_tokens("x_max", values[:2])
    b.add_tokens("x", values[2:])
    b.add_tokens("x_max", values[2:])
    assert a.merge(b).result() == whole.result() == {"x": pytest.approx(5.625 / 5), "x_max": 4.0}


def test_pending_tensors_are_read_before_pickling():
    """A learner actor sends its sums by pickle: values still on the device go as floats."""
    m = MetricSums()
    m.add_tokens("entropy", torch.tensor([1.0, 3.0]))
    m.add_total("loss", torch.tensor(-2.0))
    copy = pickle.loads(pickle.dumps(m))
    assert copy._pending == [] and copy.sums == {"entropy": 4.0, "loss": -2.0}
    assert copy.result() == m.result() == {"entropy": 2.0, "loss": -2.0}


class FakeEvent:
    """Stands in for torch.cuda.Event on the CPU: 'finishes' when the test says so."""

    clock = 0.0
    finished = True

    def __init__(self, enable_timing: bool):
        self.time = None

    def record(self):
        FakeEvent.clock += 0.5
        self.time = FakeEvent.clock

    def query(self) -> bool:
        return FakeEvent.finished

    def synchronize(self):
        pass

    def elapsed_time(self, end) -> float:
        return (end.time - self.time) * 1e3  # milliseconds, as CUDA's


def test_cuda_compute_clock_reads_finished_events_and_keeps_a_bounded_list(monkeypatch):
    from rlpost.workers.clock import ComputeClock

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    clock = ComputeClock(cuda=True)
    FakeEvent.finished = False
    for _ in range(65):
        with clock("update"):
            pass
    assert len(clock._events) == 65 and clock.seconds == {}  # none finished: none read
    FakeEvent.finished = True
    for _ in range(10):
        with clock("logprob"):
            pass
    # the first region past 64 read all 66 finished ones; the 9 after it wait for a take
    assert len(clock._events) == 9
    assert clock.take() == {"update": 65 * 0.5, "logprob": 10 * 0.5}
    with clock("update"):
        pass
    assert clock.take() == {"update": 0.5} and clock.take() == {}
