"""One scoring process: computes the per-sample reward components of a chunk of
samples, and is killed and replaced when one component call overruns its timeout.

A pure-Python `while True: pass` cannot be interrupted from another thread, so
rewards run in a child process that can be killed. The child reports progress
and results through shared memory rather than one message per sample: a result
costs a few array writes, the call one message each way, and what a killed
child had finished survives it. Per (sample, component) cell, `status` is
PENDING (0), OK, RAISED, TIMED_OUT or SKIPPED; a restarted child skips the cells
already settled, so a chunk resumes where its predecessor stopped.

Each item of a chunk names the components that apply to its sample (its route's): the
others' cells are settled as SKIPPED (value NaN) before the child sees the chunk, so
the child, which calls only PENDING cells, never calls them.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import shutil
import signal
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass

from rlpost.rewards.base import Problem, Task

PENDING, OK, RAISED, TIMED_OUT, SKIPPED = 0, 1, 2, 3, 4
MAX_CHUNK = 1024  # samples per call (the shared arrays' capacity)
START_TIMEOUT_S = 300.0  # imports (reasoning-gym, math-verify) on a loaded machine

# (response, problem, indices of the components that apply to it)
Item = tuple[str, Problem, Collection[int]]


@dataclass
class Chunk:
    """The outcome of one chunk: values[i][c] and status[i][c] per sample i and
    per-sample component c (NaN and SKIPPED where c does not apply to sample i);
    `error` is one failure as (c, i, text), if any."""

    values: list[list[float]]
    status: list[list[int]]
    error: tuple[int, int, str] | None


def describe(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"
    except Exception:  # a hostile __str__
        return type(e).__name__


def serve(conn, components: list, task: Task, values, status, progress, scratch: str, memory_mb: int) -> None:
    """The child: build the components, then score chunks until told to stop."""
    from rlpost.rewards.components import COMPONENTS, validate_args

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    tempfile.tempdir = scratch  # removed by the parent, even after a kill
    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    try:
        fns = [COMPONENTS[c.name](validate_args(c.name, c.args), task) for c in components]
    except BaseException as e:
        conn.send(("failed", describe(e)))
        return
    conn.send(("ready", None))
    k = len(fns)
    while True:
        try:
            items = conn.recv()
        except EOFError:  # the parent is gone
            return
        if items is None:
            return
        error = None
        for i, (response, problem) in enumerate(items):
            for c, fn in enumerate(fns):
                cell = i * k + c
                if status[cell] != PENDING:
                    continue
                # started = 0 first: the parent never pairs a new cell with an old start time
                progress[2] = 0.0
                progress[0], progress[1] = i, c
                progress[2] = time.monotonic()
                try:
                    value = float(fn(response, problem))
                    if not math.isfinite(value):
                        raise ValueError(f"the reward is {value}")
                    values[cell], status[cell] = value, OK
                except BaseException as e:  # SystemExit too: nothing a reward does ends us
                    status[cell] = RAISED
                    if error is None:
                        error = (c, i, describe(e))
        progress[2] = 0.0
        conn.send(error)


class ScoringProcess:
    """Drives one `serve` child. `score` blocks until the chunk is done; a call that
    overruns `timeout_s` gets its cell marked TIMED_OUT, the child is killed and a
    new one finishes the chunk."""

    def __init__(self, components: list, task: Task, timeout_s: float, memory_mb: int):
        self.ctx = mp.get_context("spawn")  # fork is unsafe beside Ray's and torch's threads
        self.components, self.task = components, task
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.k = len(components)
        self.values = self.ctx.RawArray("d", MAX_CHUNK * max(self.k, 1))
        self.status = self.ctx.RawArray("b", MAX_CHUNK * max(self.k, 1))
        self.progress = self.ctx.RawArray("d", 3)  # sample, component, started (monotonic)
        self.proc = None
        self.start()

    def start(self) -> None:
        self.scratch = tempfile.mkdtemp(prefix="rlpost-reward-")
        os.chmod(self.scratch, 0o711)  # sandboxed programs run as other uids beneath it
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(
            target=serve,
            daemon=True,
            name="rlpost-reward",
            args=(
                child,
                self.components,
                self.task,
                self.values,
                self.status,
                self.progress,
                self.scratch,
                self.memory_mb,
            ),
        )
        self.proc.start()
        child.close()
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.conn.poll(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"reward worker did not start within {START_TIMEOUT_S:.0f}s")
        try:
            kind, detail = self.conn.recv()
        except EOFError:
            kind, detail = "failed", f"exit code {self.proc.exitcode}"
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"reward worker failed to start: {detail}")
        self.ready = True

    def score(self, items: list[Item]) -> Chunk:
        """Scores each (response, problem, components) item with the given components
        (indices into this process's components) alone."""
        assert len(items) <= MAX_CHUNK
        n, k = len(items), self.k
        rows: dict = {}  # one status row per route: items of a route share their `used`
        self.status[: n * k] = b"".join(
            rows.get(id(used))
            or rows.setdefault(id(used), bytes(PENDING if c in used else SKIPPED for c in range(k)))
            for _, _, used in items
        )
        pairs = [(response, problem) for response, problem, _ in items]
        error = None
        while True:
            self.wait_ready()
            try:
                self.conn.send(pairs)
                outcome, detail = self.wait()
            except (BrokenPipeError, ConnectionResetError):
                outcome, detail = "died", self.running_cell()
            if outcome == "done":
                error = error or detail
                break
            if outcome == "overrun":
                why = f"timed out after {self.timeout_s}s"
            else:
                self.proc.join(timeout=5)
                why = f"reward worker died (exit code {self.proc.exitcode})"
            # a death outside any reward call (e.g. a chunk it cannot unpickle) would repeat
            cells = [detail] if detail is not None else range(n * k)
            for cell in cells:
                if self.status[cell] == PENDING:
                    self.status[cell] = TIMED_OUT if outcome == "overrun" else RAISED
                    error = error or (cell % k, cell // k, why)
            self.restart()
            if detail is None:
                break
        status = [list(self.status[i * k : (i + 1) * k]) for i in range(n)]
        # a failed cell scores 0 whatever its slot held from an earlier chunk; an unused one is NaN
        values = [
            [
                v if s == OK else math.nan if s == SKIPPED else 0.0
                for v, s in zip(self.values[i * k : (i + 1) * k], row)
            ]
            for i, row in enumerate(status)
        ]
        return Chunk(values, status, error)

    def wait(self) -> tuple[str, object]:
        """("done", the child's error), ("overrun", cell) or ("died", cell or None)."""
        while True:
            started = self.progress[2]
            if started and time.monotonic() - started > self.timeout_s:
                cell = self.running_cell()
                if self.progress[2] == started:  # else it moved on meanwhile: keep waiting
                    return "overrun", cell
                continue
            budget = self.timeout_s - (time.monotonic() - started if started else 0.0)
            if self.conn.poll(max(budget, 0.0) + 0.01):
                try:
                    return "done", self.conn.recv()
                except EOFError:
                    return "died", self.running_cell()

    def running_cell(self) -> int | None:
        """The (sample, component) cell the child is in, as an index; None between calls."""
        if not self.progress[2]:
            return None
        return int(self.progress[0]) * self.k + int(self.progress[1])

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.progress[2] = 0.0
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(timeout=5)
            except (BrokenPipeError, OSError):
                pass
        self.stop()
