"""The child of a scoring process: it isolates itself, guards its standard streams, and
scores chunks into the shared cells (cells.py) until it is told to stop or retires.

It is apart from the parent's side (process.py, which also says what it guards
against) because it is all the child runs: started by spawn, the child imports this
module afresh and gets its pipes, components and shared arrays as `serve`'s arguments.
A call that leaves it unfit (memory past its mark, standard streams it cannot
restore) makes it retire: it says so and exits, and the parent starts a fresh one.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import select
import signal
import sys
import tempfile
import time

from rlpost.rewards.base import Task
from rlpost.rewards.scoring.cells import EXITED, MAX_CHUNK, MEMORY, OK, PENDING, RAISED
from rlpost.rewards.scoring.memory import OwnAddressSpace, memory_mark

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
REAP_AFTER_S = 0.001


def describe(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"
    except Exception:  # a hostile __str__
        return type(e).__name__


class Stdio:
    """The child's standard streams: fd 0 reads /dev/null, fds 1 and 2 write to `out`
    (the pipe the parent drains). Copies of the three fds are kept above them, so
    what a reward closes, redirects or replaces (fds or sys.std* objects) is put back."""

    def __init__(self, out: int):
        null = os.open(os.devnull, os.O_RDONLY)
        for src, fd in ((null, 0), (out, 1), (out, 2)):
            os.dup2(src, fd)
        os.close(null)
        self.saved = [os.dup(fd) for fd in range(3)]  # not inherited by its subprocesses
        self.inodes = [os.fstat(fd).st_ino for fd in range(3)]
        self.poller = select.poll()
        for fd, event in ((0, select.POLLIN), (1, select.POLLOUT), (2, select.POLLOUT)):
            self.poller.register(fd, event)
        # the interpreter's own stream objects close fds 0-2 when collected: keep them
        self.originals = (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__)
        self.install()

    def install(self) -> None:
        """Fresh sys.std* objects over fds 0-2 (closing them leaves the fds open)."""
        text = {"encoding": "utf-8", "closefd": False}
        self.streams = (
            open(0, errors="replace", **text),
            open(1, "w", buffering=1, errors="backslashreplace", **text),
            open(2, "w", buffering=1, errors="backslashreplace", **text),
        )
        sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = self.streams

    def usable(self) -> bool:
        """Whether the next call finds sys.std* as installed and fds 0-2 open, readable
        and writable at once (~1 us: one poll, after every call). Not seen: fds swapped
        for other open files (see `intact`)."""
        stdin, stdout, stderr = self.streams
        if sys.stdin is not stdin or sys.stdout is not stdout or sys.stderr is not stderr:
            return False
        if stdin.closed or stdout.closed or stderr.closed:
            return False
        ready = self.poller.poll(0)  # a closed fd: POLLNVAL; a pipe without reader: POLLERR
        return len(ready) == 3 and all(event in (select.POLLIN, select.POLLOUT) for _, event in ready)

    def intact(self) -> bool:
        """`usable`, and fds 0-2 are still the files they were (after each chunk)."""
        try:
            return self.usable() and [os.fstat(fd).st_ino for fd in range(3)] == self.inodes
        except OSError:
            return False

    def repair(self) -> bool:
        """Put fds 0-2 and the stream objects back; False when that is impossible
        (the reward closed the copies too)."""
        try:
            for fd in range(3):
                os.dup2(self.saved[fd], fd)
            if [os.fstat(fd).st_ino for fd in range(3)] != self.inodes:
                return False
        except OSError:
            return False
        for stream in self.streams:  # what they buffered goes to the parent's pipe now
            try:
                stream.flush()
            except Exception:  # closed
                pass
        self.install()
        return True


def isolate() -> None:
    """The child leads its own session and process group (what a kill sweeps), adopts
    the orphans of its descendants (so they stay in its tree), and dies with its parent."""
    parent = os.getppid()
    try:
        os.setsid()
    except OSError:  # already a group leader: the sweep of its descendants still holds
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the process group still holds
        pass
    if os.getppid() != parent:  # the parent died before PDEATHSIG was set
        os._exit(1)


def reap_orphans() -> None:
    """Collect the exited processes it adopted as a subreaper (their parents died), so
    that killed sandbox runs do not pile up as zombies. Between calls, no reward is
    waiting on a child of its own. (Called after calls that took REAP_AFTER_S: starting
    a process takes longer than that.)"""
    if not hasattr(os, "waitid"):
        return
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    for _ in range(MAX_CHUNK):
        try:
            info = os.waitid(os.P_ALL, 0, flags)
        except ChildProcessError:
            return
        if info is None:
            return
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:
            return


def serve(
    conn, out, components: list, task: Task, values, status, progress, scratch: str, memory_mb: int
) -> None:
    """The child: build the components, then score chunks until told to stop (or until
    it retires: it then says so and exits)."""
    from rlpost.rewards.components import COMPONENTS, validate_args

    isolate()
    stdio = Stdio(out.fileno())
    out.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    tempfile.tempdir = scratch  # removed by the parent, even after a kill
    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    try:
        fns = [COMPONENTS[c.name](validate_args(c.name, c.args), task) for c in components]
    except BaseException as e:
        conn.send(("failed", describe(e)))
        return
    own_size = OwnAddressSpace()
    mark = memory_mark(own_size(), memory_mb)
    conn.send(("ready", mark))
    k = len(fns)
    while True:
        try:
            items = conn.recv()
        except EOFError:  # the parent is gone
            return
        if items is None:
            return
        error = retire = None
        for i, (response, problem) in enumerate(items):
            for c, fn in enumerate(fns):
                cell = i * k + c
                if status[cell] != PENDING:
                    continue
                # started = 0 first: the parent never pairs a new cell with an old start time
                progress[2] = 0.0
                progress[0], progress[1] = i, c
                progress[3] += 1
                progress[2] = time.monotonic()
                try:
                    value = float(fn(response, problem))
                    if not math.isfinite(value):
                        raise ValueError(f"the reward is {value}")
                    values[cell], status[cell] = value, OK
                except BaseException as e:  # SystemExit too: nothing a reward does ends us
                    if isinstance(e, MemoryError):
                        status[cell], retire = MEMORY, "memory"
                    else:
                        status[cell] = EXITED if isinstance(e, SystemExit) else RAISED
                    if error is None:
                        error = (c, i, describe(e))
                took = time.monotonic() - progress[2]
                progress[2] = 0.0
                if not stdio.usable() and not stdio.repair():
                    retire = "stdio"
                if mark and own_size() > mark:
                    retire = "memory"
                if took > REAP_AFTER_S:
                    reap_orphans()
                if retire:
                    break
            if retire:
                break
        if not retire and not stdio.intact() and not stdio.repair():
            retire = "stdio"
        conn.send(("retire" if retire else "done", error))
        if retire:
            return
