"""The clock of a worker's own compute, which every role (learner, rollout) keeps."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class ComputeClock:
    """Seconds a worker spends in its compute (generation, forward, backward,
    optimizer step), summed per name until taken: the controller compares them
    with its wall times to see what the framework itself costs."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.seconds: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, name: str):
        if not self.cuda:
            start = time.perf_counter()
            yield
            self._add(name, time.perf_counter() - start)
            return
        # CUDA runs asynchronously: events in the stream time the region's own kernels,
        # and are read when taken, so timing never makes the host wait for the GPU.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((name, start, end))
        if len(self._events) > 64:  # jobs that never take (sft, dpo) keep a bounded list
            self._read_events(wait=False)

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def _read_events(self, wait: bool) -> None:
        """Adds the regions whose kernels have finished (all of them, waiting, if `wait`)."""
        left = []
        for name, start, end in self._events:
            if wait or end.query():
                end.synchronize()
                self._add(name, start.elapsed_time(end) / 1e3)
            else:
                left.append((name, start, end))
        self._events = left

    def take(self) -> dict[str, float]:
        """The sums since the last take."""
        self._read_events(wait=True)
        seconds, self.seconds = self.seconds, {}
        return seconds
