"""Exact reduction of metrics over micro-batches, ranks and mini-batches.

Token metrics are kept as (sum, count) so the mean over a step is over all of
its tokens, whatever the split; names ending in _min / _max keep extremes;
`add_total` values are summed (e.g. the loss, whose weights already normalise).
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

    def add_tokens(self, name: str, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        values = values.detach().double()
        if name.endswith("_max"):
            self._extreme(name, values.max().item(), max)
        elif name.endswith("_min"):
            self._extreme(name, values.min().item(), min)
        else:
            self.sums[name] += values.sum().item()
            self.counts[name] += values.numel()

    def add_mean(self, name: str, value: float, count: float = 1.0) -> None:
        self.sums[name] += value * count
        self.counts[name] += count

    def add_total(self, name: str, value: float) -> None:
        self.sums[name] += value
        self.counts.setdefault(name, 0.0)

    def _extreme(self, name: str, value: float, pick) -> None:
        self.extremes[name] = pick(self.extremes.get(name, value), value)

    def merge(self, other: "MetricSums") -> "MetricSums":
        for k, v in other.sums.items():
            self.sums[k] += v
        for k, v in other.counts.items():
            self.counts[k] += v
        for k, v in other.extremes.items():
            self._extreme(k, v, max if k.endswith("_max") else min)
        return self

    def result(self, prefix: str = "") -> dict[str, float]:
        out = {}
        for k, s in self.sums.items():
            c = self.counts[k]
            out[prefix + k] = s / c if c else s
        out.update({prefix + k: v for k, v in self.extremes.items()})
        return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
