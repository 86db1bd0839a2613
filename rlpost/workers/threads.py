"""How many CPU threads a worker process's torch uses: set once, as the worker starts."""

from __future__ import annotations

import os

import torch


def set_threads() -> None:
    # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors; rollout and learning
    # take turns, so each may use every core of the machine.
    torch.set_num_threads(int(os.environ.get("RLPOST_THREADS", os.cpu_count() or 1)))
