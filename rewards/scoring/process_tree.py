"""Killing a scoring process's child with every process it started, and seeing whether
it exited without reaping it.

A reward may leave processes behind: children in new sessions, orphaned daemons. The
child leads its own session and adopts its descendants' orphans (child.py), so they
are all in its tree, read from /proc; the kill stops each before it kills them all.
Until the child is reaped its PID cannot be reused, so the checks here never wait
for it (WNOWAIT), and a kill never reaches a stranger.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Collection


def descendants(roots: set[int]) -> set[int]:
    """The processes descended from `roots` (read from /proc), roots excluded."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found and child not in roots:
                found.add(child)
                todo.append(child)
    return found


def signal_all(pids: Collection[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:  # gone, or another uid's (a sandboxed program: it dies with its launcher)
            pass


def kill_tree(pid: int) -> None:
    """SIGKILL a child that leads its own process group, that group, and every process
    descended from it; each is stopped first, so none forks past the sweep. Call it
    before reaping the child: until then its PID (the group's id) cannot be reused."""
    try:
        os.killpg(pid, signal.SIGSTOP)
    except OSError:  # not (or no longer) a group leader: its tree still goes
        pass
    swept = {pid}
    for _ in range(64):
        new = descendants(swept)
        if not new:
            break
        signal_all(new, signal.SIGSTOP)
        swept |= new
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    signal_all(swept, signal.SIGKILL)


def reaped(pid: int) -> bool:
    """Whether our child `pid` is gone for good (waited for), without waiting for it."""
    if not hasattr(os, "waitid"):  # not Linux: it is stopped before it is joined
        return False
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


def running(pid: int) -> bool:
    """Whether our child `pid` has not exited, without reaping it."""
    if not hasattr(os, "waitid"):  # not Linux: a death shows when its chunk is sent
        return True
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False
