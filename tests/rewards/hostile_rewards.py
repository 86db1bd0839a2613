"""Reward functions that attack their own scoring process, for tests/rewards/test_pool_walls.py.

They live apart from the tests so that a scoring process imports only this (light)
module, as it would a user's reward module: `tests.rewards.hostile_rewards:hostile`,
which dispatches on the response: "ok" (or anything not below) is a well-behaved call.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import threading
import time

from rlpost.rewards.base import Problem

KEEP: list = []  # what the leaking rewards hold on to, per process


def innocent() -> float:
    """What a well-behaved reward does: prints, logs to stderr, reads stdin (EOF), allocates."""
    print("scoring", flush=True)
    sys.stderr.write("a note\n")
    sys.stderr.flush()
    sys.stdin.read()
    return float(len(bytearray(16 << 20)) > 0)


def hostile(response: str, problem: Problem) -> float:
    kind = response.split(":")[0]
    if kind == "close_fds":  # the descriptors under the streams
        for fd in (0, 1, 2):
            os.close(fd)
    elif kind == "close_streams":
        sys.stdout.close()
        sys.stderr.close()
        sys.stdin.close()
    elif kind == "swap_fds":  # fd 1 and 2 now point at a file of its own
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    elif kind == "flood":  # 8 MiB to fd 1, 8 MiB to sys.stderr
        block = b"x" * (1 << 20)
        for _ in range(8):
            view = memoryview(block)
            while view:
                view = view[os.write(1, view) :]
        sys.stderr.write("y" * (8 << 20))
        sys.stderr.flush()
    elif kind == "exit":
        sys.exit(3)
    elif kind == "os_exit":
        os._exit(7)
    elif kind == "segfault":
        ctypes.string_at(0)
    elif kind == "gil_sleep":  # libc sleep called with the GIL held (PyDLL keeps it)
        ctypes.PyDLL(None).sleep(3600)
    elif kind == "regex":  # catastrophic backtracking: the GIL is never released
        re.match(r"(a+)+$", "a" * 64 + "b")
    elif kind == "leak":  # without bound, in one call
        while True:
            KEEP.append(bytearray(32 << 20))
    elif kind == "leak_some":  # 256 MiB more each call, kept
        KEEP.append(bytearray(256 << 20))
        return 1.0
    elif kind == "orphan":  # a child in its group, one in a session of its own, a daemon; then hang
        _, marker, flag = response.split(":")
        sleeper = ["sleep", "300", marker]  # the marker (a unique fraction of a second) finds them
        subprocess.Popen(sleeper)
        subprocess.Popen(sleeper, start_new_session=True)
        pid = os.fork()
        if pid == 0:  # the classic daemon: a new session, and its parent gone
            os.setsid()
            if os.fork() == 0:
                os.execvp("sleep", sleeper)
            os._exit(0)
        os.waitpid(pid, 0)
        open(flag, "w").close()
        while True:
            time.sleep(1)
    elif kind == "bloat_later":  # after the call, a thread of its own fills the address space

        def fill() -> None:
            try:
                while True:
                    KEEP.append(bytearray(16 << 20))
            except MemoryError:
                pass

        threading.Timer(0.1, fill).start()
        return 1.0
    elif kind == "stall_later":  # after the call, a thread of its own holds the GIL for good
        threading.Timer(0.1, ctypes.PyDLL(None).sleep, (3600,)).start()
        return 1.0
    elif kind == "die_later":  # the worker dies after the call, between batches
        threading.Timer(0.2, os._exit, (9,)).start()
        return 1.0
    elif kind == "hang":
        time.sleep(3600)
    return innocent()
