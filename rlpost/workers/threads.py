"""How many CPU threads a worker process's torch uses: set once, as the worker starts."""

from __future__ import annotations

import os

import torch


def set_threads(role: str | None = None) -> None:
    """RLPOST_THREADS_<ROLE> (ROLLOUT, LEARNER) for a worker of `role`, else RLPOST_THREADS,
    else every core. Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors; in a synchronous
    step rollout and learning take turns, so each may use every core of the machine; when
    they overlap (rollout.staleness), a split of the cores may serve better."""
    own = os.environ.get(f"RLPOST_THREADS_{role.upper()}") if role else None
    torch.set_num_threads(int(own or os.environ.get("RLPOST_THREADS", os.cpu_count() or 1)))
