"""Exact reduction of metrics over micro-batches, ranks and mini-batches.

Token metrics are kept as (sum, count) so the mean over a step is over all of
its tokens, whatever the split; names ending in _min / _max keep extremes;
`add_total` values are summed (e.g. the loss, whose weights already normalise).

Values given as tensors are reduced on their device and read back all at once when
the sums are next read, merged or pickled: a read per metric would stall a CUDA
learner between its forward and backward passes.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


class MetricSums:
    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.extremes: dict[str, float] = {}
        self._pending: list[tuple[str, torch.Tensor]] = []  # (name, 0-d tensor) not yet read

    def add_tokens(self, name: str, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        values = values.detach().double()
        if name.endswith("_max"):
            self._pending.append((name, values.max()))
        elif name.endswith("_min"):
            self._pending.append((name, values.min()))
        else:
            self._pending.append((name, values.sum()))
            self.counts[name] += values.numel()

    def add_mean(self, name: str, value: float, count: float = 1.0) -> None:
        self.sums[name] += value * count
        self.counts[name] += count

    def add_total(self, name: str, value: float | torch.Tensor) -> None:
        if isinstance(value, torch.Tensor):
            self._pending.append((name, value.detach().double()))
        else:
            self.sums[name] += value
        self.counts.setdefault(name, 0.0)

    def _settle(self) -> None:
        if not self._pending:
            return
        device = self._pending[0][1].device
        values = torch.stack([v.to(device) for _, v in self._pending]).tolist()  # one read
        for (name, _), value in zip(self._pending, values):
            if name.endswith("_max"):
                self._extreme(name, value, max)
            elif name.endswith("_min"):
                self._extreme(name, value, min)
            else:
                self.sums[name] += value
        self._pending = []

    def __getstate__(self) -> dict:
        self._settle()
        return self.__dict__

    def _extreme(self, name: str, value: float, pick) -> None:
        self.extremes[name] = pick(self.extremes.get(name, value), value)

    def merge(self, other: MetricSums) -> MetricSums:
        self._settle()
        other._settle()
        for k, v in other.sums.items():
            self.sums[k] += v
        for k, v in other.counts.items():
            self.counts[k] += v
        for k, v in other.extremes.items():
            self._extreme(k, v, max if k.endswith("_max") else min)
        return self

    def result(self, prefix: str = "") -> dict[str, float]:
        self._settle()
        out = {}
        for k, s in self.sums.items():
            c = self.counts[k]
            out[prefix + k] = s / c if c else s
        out.update({prefix + k: v for k, v in self.extremes.items()})
        return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
