"""The cells of a chunk, which a scoring process and its child share: per (sample,
component) a value and a status in shared memory, the running call's progress beside
them, and what the pool gets back (`Chunk`).

The child reports progress and results through shared memory rather than one message
per sample: a result costs a few array writes, the call one message each way, and what
a killed child had finished survives it. Per (sample, component) cell, `status` is
PENDING (0), OK, SKIPPED, or how the call failed: RAISED, TIMED_OUT, CUT (by the
batch deadline), EXITED (SystemExit, or the process exited), CRASHED (killed by a
signal: a segfault) or MEMORY (MemoryError, or over the limit); a restarted child
skips the cells already settled, so a chunk resumes where its predecessor stopped.

Each item of a chunk names the components that apply to its sample (its route's): the
others' cells are settled as SKIPPED (value NaN) before the child sees the chunk, so
the child, which calls only PENDING cells, never calls them.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from rlpost.rewards.base import Problem

PENDING, OK, RAISED, TIMED_OUT, SKIPPED, CUT, EXITED, CRASHED, MEMORY = range(9)
MAX_CHUNK = 1024  # samples per call (the shared arrays' capacity)
CUT_TEXT = "not scored within the batch deadline (reward.batch_timeout_s)"

# (response, problem, indices of the components that apply to it)
Item = tuple[str, Problem, Collection[int]]


@dataclass
class Chunk:
    """The outcome of one chunk: values[i][c] and status[i][c] per sample i and
    per-sample component c (NaN and SKIPPED where c does not apply to sample i);
    `error` is one failure as (c, i, text), if any; `time_lost_s` the time spent on
    calls that were killed and waiting for replacement processes; `replaced` how
    many processes were replaced meanwhile."""

    values: list[list[float]]
    status: list[list[int]]
    error: tuple[int, int, str] | None
    time_lost_s: float = 0.0
    replaced: int = 0


def unscored(items: list[Item], k: int, kind: int, text: str) -> Chunk:
    """A chunk none of whose calls ran: each applicable cell failed as `kind`."""
    status = [[kind if c in used else SKIPPED for c in range(k)] for _, _, used in items]
    values = [[0.0 if s == kind else math.nan for s in row] for row in status]
    first = next(((c, i) for i, row in enumerate(status) for c, s in enumerate(row) if s == kind), None)
    return Chunk(values, status, first and (*first, text))


class Cells:
    """One scoring process's shared arrays, for MAX_CHUNK samples of k components (cell
    i * k + c is sample i, component c). The child writes `values`, `status` and
    `progress`; the parent reads them, and marks the cells a killed or dead child left
    PENDING."""

    def __init__(self, ctx, k: int):
        self.k = k
        self.values = ctx.RawArray("d", MAX_CHUNK * max(k, 1))
        self.status = ctx.RawArray("b", MAX_CHUNK * max(k, 1))
        # sample, component, when its call started (monotonic; 0 between calls), calls begun
        self.progress = ctx.RawArray("d", 4)

    def begin(self, items: list[Item]) -> None:
        """Mark each item's cells PENDING where its components apply, else SKIPPED."""
        n, k = len(items), self.k
        rows: dict = {}  # one status row per route: items of a route share their `used`
        self.status[: n * k] = b"".join(
            rows.get(id(used))
            or rows.setdefault(id(used), bytes(PENDING if c in used else SKIPPED for c in range(k)))
            for _, _, used in items
        )

    def settle(self, cells, kind: int, why: str) -> tuple[int, int, str] | None:
        """Mark the given cells that are still PENDING as `kind`; the first as an error."""
        first = None
        for cell in cells:
            if self.status[cell] == PENDING:
                self.status[cell] = kind
                first = first or (cell % self.k, cell // self.k, why)
        return first

    def running(self) -> int | None:
        """The (sample, component) cell the child is in, as an index; None between calls."""
        if not self.progress[2]:
            return None
        return int(self.progress[0]) * self.k + int(self.progress[1])

    def outcome(self, n: int, error: tuple[int, int, str] | None, lost: float, replaced: int) -> Chunk:
        """The first `n` samples' chunk as the cells hold it."""
        k = self.k
        status = [list(self.status[i * k : (i + 1) * k]) for i in range(n)]
        # a failed cell scores 0 whatever its slot held from an earlier chunk; an unused one is NaN
        values = [
            [
                v if s == OK else math.nan if s == SKIPPED else 0.0
                for v, s in zip(self.values[i * k : (i + 1) * k], row)
            ]
            for i, row in enumerate(status)
        ]
        return Chunk(values, status, error, lost, replaced)
