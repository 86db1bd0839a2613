"""A scoring process's memory mark, and the address-space readings it is checked against.

Both sides read them: the child its own size after every call (a reading kept open,
OwnAddressSpace, as it is taken that often), to retire past its mark; the parent the
child's before each chunk, to replace one that grew past it between calls.
"""

from __future__ import annotations

import os

# a child whose address space a call left above its size once built plus this fraction
# of the rest of memory_mb retires
RECYCLE_AT = 0.75
PAGE = os.sysconf("SC_PAGE_SIZE")


def memory_mark(built: int, memory_mb: int) -> int:
    """The address space past which a child retires (0: no limit, no mark)."""
    limit = memory_mb << 20
    return int(built + RECYCLE_AT * max(limit - built, 0)) if memory_mb else 0


def address_space(pid: int) -> int:
    """Bytes of address space (what RLIMIT_AS counts) of a process; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[0]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


class OwnAddressSpace:
    """address_space() of this process at ~1 us a reading (/proc/self/statm kept open)."""

    def __init__(self):
        try:
            self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self.fd = -1

    def __call__(self) -> int:
        try:
            return int(os.pread(self.fd, 64, 0).split()[0]) * PAGE
        except (OSError, ValueError, IndexError):  # closed (or reused) by a reward: no reading
            return 0
