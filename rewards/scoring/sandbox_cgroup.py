"""The program's own cgroup, for rlpost.rewards.scoring.sandbox: the memory and pids
limits over all of a program's processes together, which per-process rlimits miss.

`Cgroup` is made before the program starts (its limits written), joined by the launcher
(sandbox_launcher.py: the caller moves it in while it starts up, else it moves itself),
read for OOM kills and removed after the program ends. Where the programs' cgroups are
made (cgroup v2, or the v1 memory and pids hierarchies; $RLPOST_SANDBOX_CGROUP for a
normal user) is found once per process, which then also removes the cgroups its dead
predecessors left behind. What the wall stops and what it needs: sandbox.py's docstring.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rlpost.rewards.scoring.sandbox_errors import SandboxUnavailable

if TYPE_CHECKING:
    from rlpost.rewards.scoring.sandbox import Limits

# The parent cgroup (a cgroup v2 directory) for the programs' cgroups, for a normal user
# or a root process that is not at the root of its cgroup v2 hierarchy.
CGROUP_ENV = "RLPOST_SANDBOX_CGROUP"
CGROUP_PREFIX = "rlpost-sandbox-"  # then the creating process's PID: dead ones are swept
CGROUP_STALE_S = 60.0


class Cgroup:
    """The program's own cgroup: made before it starts (limits written), joined by the
    launcher (so that the program is born in it), read (OOM kills) and removed after it ends."""

    def __init__(self, limits: Limits):
        version, parents = _cgroup_parents()
        self.version = version
        self.name = f"{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.dirs = [parent / self.name for parent in parents]
        tasks = limits.processes + 1  # and the launcher
        memory = limits.memory_mb << 20
        if version == 2:
            files = {
                "memory.max": memory,
                "memory.swap.max": 0,
                "memory.oom.group": 1,
                "pids.max": tasks,
            }
            plan = [(self.dirs[0], files)]
        else:  # v1: the memory and the pids hierarchies
            files = {
                "memory.limit_in_bytes": memory,
                "memory.memsw.limit_in_bytes": memory,
                "memory.oom_control": 0,
            }
            plan = [(self.dirs[0], files), (self.dirs[1], {"pids.max": tasks})]
        made = []
        try:
            for directory, files in plan:
                directory.mkdir()
                made.append(directory)
                for file, value in files.items():
                    if (
                        file in ("memory.swap.max", "memory.memsw.limit_in_bytes")
                        and not (directory / file).exists()
                    ):
                        if _swap_on():  # without the file swap cannot be limited
                            raise OSError(f"swap is on and {directory} has no {file}")
                        continue
                    _write(directory / file, str(value))
        except OSError as e:
            for directory in made:
                _rmdir(directory)
            raise SandboxUnavailable(f"cannot set up the program's cgroup under {parents}: {e}") from e

    @property
    def procs(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def enter(self, pid: int) -> None:
        """Move the launcher in (it checks, and moves itself if this failed)."""
        for path in self.procs:
            try:
                _write(Path(path), str(pid))
            except OSError:
                return

    def oom_kills(self) -> int:
        """How many of the program's processes the memory limit killed."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            lines = (self.dirs[0] / name).read_text().splitlines()
        except OSError:
            return 0
        counts = dict(line.split() for line in lines if len(line.split()) == 2)
        return int(counts.get("oom_kill", 0)) + int(counts.get("oom_group_kill", 0))

    def remove(self) -> None:
        for directory in self.dirs:
            _rmdir(directory, wait_s=2.0)


@functools.cache
def _cgroup_parents() -> tuple[int, tuple[Path, ...]]:
    """(cgroup version, the directories the programs' cgroups are made in: v2 one, v1 the
    memory and pids ones). Removes, once, those its dead predecessors left behind."""
    with open("/proc/self/mountinfo") as f, open("/proc/self/cgroup") as g:
        version, parents = _find_cgroup_parents(f.read(), g.read(), os.environ.get(CGROUP_ENV))
    _sweep(parents)
    return version, parents


def _find_cgroup_parents(
    mountinfo: str, own_cgroups: str, chosen: str | None
) -> tuple[int, tuple[Path, ...]]:
    """From /proc/self/mountinfo and /proc/self/cgroup: cgroup v2 when its hierarchy has the
    memory and pids controllers, else the v1 memory and pids hierarchies."""
    mounts = {}  # "cgroup2" or a v1 controller -> (mount point, root of the mount)
    for line in mountinfo.splitlines():
        fields, after = line.split(" - ", 1)
        root, point = (_unescape(x) for x in fields.split()[3:5])
        fstype, _, options = after.split()[:3]
        if fstype == "cgroup2":
            mounts.setdefault("cgroup2", (point, root))
        elif fstype == "cgroup":
            for controller in ("memory", "pids"):
                if controller in options.split(","):
                    mounts.setdefault(controller, (point, root))
    own = {}  # controller ("" for v2) -> our cgroup's path
    for line in own_cgroups.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            own[controller] = path

    def place(point: str, root: str, path: str) -> Path:
        relative = path[len(root) :] if root != "/" and path.startswith(root) else path
        return Path(point, relative.lstrip("/"))

    if "cgroup2" in mounts:
        point, _ = mounts["cgroup2"]
        if {"memory", "pids"} <= set(Path(point, "cgroup.controllers").read_text().split()):
            return 2, (_v2_parent(point, chosen),)
    if "memory" in mounts and "pids" in mounts:
        parents = tuple(place(*mounts[c], own.get(c, "/")) for c in ("memory", "pids"))
        for parent in parents:
            if not os.access(parent, os.W_OK):
                raise SandboxUnavailable(
                    f"the sandbox cannot make cgroups in {parent} (cgroup v1): run as root or in a cgroup "
                    "delegated to this user (memory and pids)"
                )
        return 1, parents
    raise SandboxUnavailable("no cgroup hierarchy with the memory and pids controllers is mounted")


def _v2_parent(point: str, chosen: str | None) -> Path:
    """The cgroup v2 directory to make the programs' cgroups in, with the memory and pids
    controllers enabled for its children: `chosen` ($RLPOST_SANDBOX_CGROUP; a path in the
    hierarchy), else the hierarchy's root when we may write there (root). cgroup v2
    enables controllers for children only in a cgroup holding no processes (the root
    excepted), so a normal user needs a delegated cgroup apart from the trainer's own."""
    if chosen:
        parent = Path(
            chosen if chosen.startswith(point.rstrip("/") + "/") else Path(point, chosen.lstrip("/"))
        )
    elif os.access(point, os.W_OK):
        parent = Path(point)
    else:
        raise SandboxUnavailable(
            f"the sandbox cannot make memory- and pids-limited cgroups (cgroup v2 at {point}): run as root, "
            f"or set {CGROUP_ENV} to a cgroup this user may write, holding no processes, with the memory "
            "and pids controllers available (e.g. made beside the trainer's own in a systemd unit with "
            "Delegate=yes)"
        )
    try:
        enabled = Path(parent, "cgroup.subtree_control").read_text().split()
        if not {"memory", "pids"} <= set(enabled):
            _write(parent / "cgroup.subtree_control", "+memory +pids")
    except OSError as e:
        raise SandboxUnavailable(f"cannot enable the memory and pids controllers in {parent}: {e}") from e
    return parent


def _sweep(parents: tuple[Path, ...]) -> None:
    """Remove the programs' cgroups left by processes that died (a killed trainer)."""
    for parent in parents:
        for directory in parent.glob(CGROUP_PREFIX + "*"):
            try:
                pid = int(directory.name[len(CGROUP_PREFIX) :].split("-")[0])
                if time.time() - directory.stat().st_mtime < CGROUP_STALE_S:
                    continue
                os.kill(pid, 0)
            except ProcessLookupError:
                _rmdir(directory)  # fails while it holds processes
            except (ValueError, OSError):
                pass


def _swap_on() -> bool:
    with open("/proc/swaps") as f:
        return len(f.read().splitlines()) > 1


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _rmdir(path: Path, wait_s: float = 0.0) -> None:
    """rmdir of a cgroup; the exiting processes may hold it busy for a moment."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field
