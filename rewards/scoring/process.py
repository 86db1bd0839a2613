"""One scoring process: computes the per-sample reward components of a chunk of
samples; it is killed and replaced when a component call overruns its timeout, the
batch's deadline passes, or the process dies, and it retires itself when a call
leaves it unfit (its memory near the limit, standard streams it cannot restore).

A pure-Python `while True: pass` cannot be interrupted from another thread, so
rewards run in a child process that can be killed. This module is the parent's side:
`ScoringProcess` starts the child (child.py), sends it chunks, keeps the clock on its
calls and reads their outcomes from the cells they share (cells.py); a thread of its
own drains the child's output.

What a reward function (unsandboxed, in the child) cannot do to the pool:
- break the protocol through stdio: the child talks to its parent over its own
  pipe, never fds 0-2. Its stdin is /dev/null; its stdout and stderr go to a pipe
  that the parent drains (forwarding at most LOG_BYTES per chunk to its own fd 2,
  never blocking on it), so flooding them costs nothing. Streams or fds 0-2 that a
  call closes or replaces are restored before the next call.
- hang the parent: the parent keeps the clock (its own monotonic time against
  the start the child wrote before the call) and waits on the child's pipe and
  exit sentinel, so a call that holds the GIL in C, sleeps, or exits is seen.
- leave processes behind: the child leads its own session and is a child
  subreaper; a kill stops and kills its process group and every descendant
  (children in new sessions and orphaned daemons included), and the child dies
  with its parent (PR_SET_PDEATHSIG). See process_tree.py.
- grow without bound: the child's address space is limited (RLIMIT_AS); when a
  call leaves it past its mark (RECYCLE_AT of the way from its size once built to
  the limit), or raised MemoryError, it retires and a fresh process goes on. A
  child that died or grew past its mark between calls is replaced before the next
  chunk is sent. See memory.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.reduction import ForkingPickler

from rlpost.rewards.base import Task
from rlpost.rewards.scoring.cells import (
    CRASHED,
    CUT,
    CUT_TEXT,
    EXITED,
    MAX_CHUNK,
    TIMED_OUT,
    Cells,
    Chunk,
    Item,
    unscored,
)
from rlpost.rewards.scoring.child import serve
from rlpost.rewards.scoring.memory import address_space
from rlpost.rewards.scoring.process_tree import kill_tree, reaped, running

START_TIMEOUT_S = 300.0  # imports (reasoning-gym, math-verify) on a loaded machine
LOG_BYTES = 64 << 10  # a worker's stdout+stderr forwarded per chunk; the rest is dropped
SEND_AT_ONCE = 32 << 10  # a chunk message of at most this many bytes never blocks the send


def send_quietly(conn, message: bytes) -> None:
    try:
        conn.send_bytes(message)
    except OSError:  # the child was killed meanwhile
        pass


def forward_output(reader, budget: list[int]) -> None:
    """The parent's side of the child's stdout and stderr: read until every writer is
    gone; forward what `budget` allows to fd 2 when it can take it at once (a full or
    closed fd 2 drops it), so the child never blocks on its output."""
    fd = reader.fileno()
    poller = select.poll()
    poller.register(2, select.POLLOUT)
    try:
        while data := os.read(fd, 1 << 16):
            if budget[0] <= 0:
                continue
            budget[0] -= len(data)
            if budget[0] <= 0:
                data = (
                    data[: len(data) + budget[0]]
                    + b"\n[rlpost: reward worker output over the limit dropped]\n"
                )
            view = memoryview(data)
            while view and poller.poll(0):
                try:
                    view = view[os.write(2, view[: select.PIPE_BUF]) :]
                except OSError:
                    break
    except OSError:
        pass
    finally:
        reader.close()


class ScoringProcess:
    """Drives one `serve` child. `score` blocks until the chunk is done or its budget
    is spent; a call that overruns `timeout_s` gets its cell marked TIMED_OUT, one that
    kills the child is marked by how it died, the child is replaced and a new one
    finishes the chunk."""

    def __init__(self, components: list, task: Task, timeout_s: float, memory_mb: int):
        self.ctx = mp.get_context("spawn")  # fork is unsafe beside Ray's and torch's threads
        self.components, self.task = components, task
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.k = len(components)
        self.cells = Cells(self.ctx, self.k)
        self.log_budget = [LOG_BYTES]
        self.proc, self.exitcode, self.mark = None, None, 0
        self.start()

    def start(self) -> None:
        self.scratch = tempfile.mkdtemp(prefix="rlpost-reward-")
        os.chmod(self.scratch, 0o711)  # sandboxed programs run as other uids beneath it
        self.conn, child = self.ctx.Pipe()
        reader, writer = self.ctx.Pipe(duplex=False)
        self.proc = self.ctx.Process(
            target=serve,
            daemon=True,
            name="rlpost-reward",
            args=(
                child,
                writer,
                self.components,
                self.task,
                self.cells.values,
                self.cells.status,
                self.cells.progress,
                self.scratch,
                self.memory_mb,
            ),
        )
        self.proc.start()
        child.close()
        writer.close()
        threading.Thread(
            target=forward_output, args=(reader, self.log_budget), daemon=True, name="rlpost-reward-output"
        ).start()
        self.events = select.poll()  # its answers, and its exit (the sentinel)
        self.events.register(self.conn.fileno(), select.POLLIN)
        self.events.register(self.proc.sentinel, select.POLLIN)
        self.started = time.monotonic()
        self.ready = False

    def wait_ready(self, deadline: float | None = None) -> bool:
        """True once the child has built its components; False if `deadline` (monotonic)
        comes first (the child keeps starting). A child that fails to start raises."""
        if self.ready:
            return True
        limit = self.started + START_TIMEOUT_S
        until = limit if deadline is None else min(limit, deadline)
        if not self.conn.poll(max(until - time.monotonic(), 0.0)):
            if until < limit:
                return False
            self.stop()
            raise RuntimeError(f"reward worker did not start within {START_TIMEOUT_S:.0f}s")
        try:
            kind, detail = self.conn.recv()
        except Exception:  # EOF: it died before saying why
            self.stop()
            kind, detail = "failed", self.death()
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"reward worker failed to start: {detail}")
        self.mark = detail
        self.ready = True
        return True

    def unfit(self) -> bool:
        """Whether the (ready) child died or grew past its memory mark since its last call."""
        if not running(self.proc.pid):
            return True
        return bool(self.mark) and address_space(self.proc.pid) > self.mark

    def score(self, items: list[Item], budget_s: float | None = None) -> Chunk:
        """Scores each (response, problem, components) item with the given components
        (indices into this process's components) alone, within `budget_s` seconds from
        now if given: the cells still unsettled then are CUT."""
        assert len(items) <= MAX_CHUNK
        if budget_s is not None and budget_s <= 0:
            return unscored(items, self.k, CUT, CUT_TEXT)
        deadline = None if budget_s is None else time.monotonic() + budget_s
        n, k = len(items), self.k
        self.cells.begin(items)
        message = ForkingPickler.dumps([(response, problem) for response, problem, _ in items])
        self.log_budget[0] = LOG_BYTES
        error, lost, replaced, blind_deaths = None, 0.0, 0, 0
        while True:
            if self.ready and self.unfit():  # replaced before it costs a sample
                self.restart()
                replaced += 1
            if not self.ready:  # a replacement still starting: its wait is time lost
                waited = time.monotonic()
                up = self.wait_ready(deadline)
                lost += time.monotonic() - waited
            else:
                up = True
            if not up:
                first = self.cells.settle(range(n * k), CUT, CUT_TEXT)
                error = error or first
                break
            try:
                self.send(message)
                outcome, detail, started = self.wait(deadline)
            except OSError:  # BrokenPipe, ConnectionReset: it died meanwhile
                outcome, detail, started = "died", self.cells.running(), self.cells.progress[2]
            if outcome == "done":
                error = error or detail
                break
            if outcome == "retire":  # it finished a call and then stopped itself
                error = error or detail
                self.restart()
                replaced += 1
                continue
            lost += time.monotonic() - started if started else 0.0
            self.stop()  # killed before its cells are marked: it writes no more
            if outcome == "overrun":
                kind, why = TIMED_OUT, f"timed out after {self.timeout_s}s"
            elif outcome == "stuck":
                kind, why = TIMED_OUT, f"reward worker stuck outside any call for {self.timeout_s}s"
            elif outcome == "cut":
                kind, why = CUT, CUT_TEXT
            else:  # how it died, not our kill: it was dead when stopped
                kind, why = CRASHED if (self.exitcode or 0) < 0 else EXITED, self.death()
            if outcome == "cut":
                cells = range(n * k)
            elif detail is not None:
                cells = [detail]
            else:  # died or stuck outside any call: once more in a fresh process, then give up
                blind_deaths += 1
                cells = range(n * k) if blind_deaths > 1 else []
            first = self.cells.settle(cells, kind, why)  # not short-circuited: always marks
            error = error or first
            self.start()
            replaced += 1
            if outcome == "cut" or (detail is None and blind_deaths > 1):
                break
        return self.cells.outcome(n, error, lost, replaced)

    def send(self, message: bytes) -> None:
        """Send a pickled chunk. One larger than a pipe can take at once goes from a
        thread of its own: a child that never reads it then cannot block this one (the
        wait sees it stuck; killing it ends the thread's write)."""
        if len(message) <= SEND_AT_ONCE:
            self.conn.send_bytes(message)
        else:
            threading.Thread(target=send_quietly, args=(self.conn, message), daemon=True).start()

    def wait(self, deadline: float | None) -> tuple[str, object, float]:
        """("done" | "retire", the child's error, 0) or ("overrun" | "cut" | "died" |
        "stuck", the running cell or None, when that call started). Stuck: no call
        began or ran for timeout_s (a child that never reads its chunk, or hangs
        between calls)."""
        answer, sentinel = self.conn.fileno(), self.proc.sentinel
        calls, idle_since = self.cells.progress[3], time.monotonic()
        while True:
            now = time.monotonic()
            started = self.cells.progress[2]
            if started and now - started > self.timeout_s:
                cell = self.cells.running()
                if self.cells.progress[2] == started:  # else it moved on meanwhile: keep waiting
                    return "overrun", cell, started
                continue
            if started or self.cells.progress[3] != calls:
                calls, idle_since = self.cells.progress[3], now
            elif now - idle_since > self.timeout_s and not self.conn.poll(0):
                return "stuck", None, idle_since
            if deadline is not None and now >= deadline and not self.conn.poll(0):
                return "cut", self.cells.running(), started
            budget = self.timeout_s - (now - (started or idle_since))
            if deadline is not None:
                budget = min(budget, deadline - now)
            ready = {fd for fd, _ in self.events.poll(max(budget, 0.0) * 1000 + 10)}
            if answer in ready:
                try:
                    kind, error = self.conn.recv()
                    if kind in ("done", "retire"):
                        return kind, error, 0.0
                except Exception:  # EOF, or not a message of ours: the pipe is broken
                    pass
                return "died", self.cells.running(), self.cells.progress[2]
            if sentinel in ready:
                if self.conn.poll(0):  # its last message came before it exited
                    continue
                return "died", self.cells.running(), self.cells.progress[2]

    def death(self) -> str:
        """How the last stopped child had ended."""
        code = self.exitcode
        if code is not None and code < 0:
            try:
                return f"reward worker died ({signal.Signals(-code).name})"
            except ValueError:
                pass
        return f"reward worker died (exit code {code})"

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        if not reaped(self.proc.pid):  # else its PID could be anyone's by now
            kill_tree(self.proc.pid)
        self.proc.join()
        self.exitcode = self.proc.exitcode
        self.conn.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.cells.progress[2] = 0.0
        self.proc = None

    def close(self) -> None:
        self.stop()
