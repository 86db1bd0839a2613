"""Starts one untrusted program for rlpost.rewards.scoring.sandbox: a script, not a module.

Run as `python -I -S sandbox_launcher.py SPEC_JSON` in a new session, so it
imports the standard library only. It is trusted; the program is not. It
  1. joins the program's cgroup (made, and usually joined for it, by the caller)
     while it still has the caller's credentials (as root, it keeps itself out of
     the OOM killer's choice there), and reads the program's code from an
     inherited file;
  2. moves its future children into new network, PID and IPC namespaces and itself
     into a new mount namespace (and a new user namespace when not root, which is
     what lets a normal user do that, mapping its own uid and gid only);
  3. in the mount namespace: every mount read-only and private (mount_setattr,
     recursive), then a size- and inode-limited tmpfs over the temporary directory,
     holding the program's directory and main.py: the only place it can write;
  4. forks the program, which becomes PID 1 of the new PID namespace: when it
     exits or is killed, the kernel kills everything it forked;
  5. in that child: resource limits, an unprivileged uid when
     running as root (root ignores RLIMIT_NPROC and owns every root file),
     no-new-privileges, a Landlock ruleset (writes only under the program's
     directory; no TCP; when the kernel has them: no signals or abstract UNIX
     sockets to anything outside), a seccomp filter (socket families other than
     UNIX, IPv4, IPv6 and netlink, io_uring, and the kernel keyrings refused),
     then exec of a fresh interpreter on the program;
  6. waits for it and writes {"returncode", "cpu_s"} as a JSON line to the
     status pipe; a failed setup step writes {"setup_error": ...} there first.
When the launcher exits, its namespaces die with it: the tmpfs and its files, and
the IPC objects (System V shared memory, message queues, semaphores) the program made.

The spec's "mount", "ipc", "cgroup_procs" and "seccomp" say which of those walls to
build; the caller leaves one out only when a test shows what it stops.
"""

import ctypes
import json
import os
import resource
import struct
import sys

CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 38, 22
SECCOMP_MODE_FILTER = 2
SIGKILL = 9
MS_NOSUID, MS_NODEV, MS_PRIVATE = 0x2, 0x4, 1 << 18
# These syscall numbers are the same on every architecture (added after the unification).
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
MOUNT_SETATTR = 442
IO_URING_SYSCALLS = (425, 426, 427)  # io_uring_setup, io_uring_enter, io_uring_register
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
# Write-like filesystem rights by Landlock ABI version (reads and execution stay allowed):
# ABI 1 write_file, remove_dir, remove_file, make_{char,dir,reg,sock,fifo,block,sym};
# 2 refer (link/rename across directories); 3 truncate; 5 ioctl on devices.
FS_WRITE_BY_ABI = {
    1: sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12)),
    2: 1 << 13,
    3: 1 << 14,
    5: 1 << 15,
}
FS_FILE_RIGHTS = (1 << 1) | (1 << 14) | (1 << 15)  # the rights that apply to a single file
NET_TCP_BIND_CONNECT = 0b11  # ABI 4
SCOPE_ABSTRACT_UNIX_SIGNAL = 0b11  # ABI 6

# seccomp: per architecture, its audit id and the syscalls the filter looks at (besides io_uring's).
SECCOMP_ARCH = {
    "x86_64": {"audit": 0xC000003E, "socket": 41, "keys": (248, 249, 250)},
    "aarch64": {"audit": 0xC00000B7, "socket": 198, "keys": (217, 218, 219)},
}
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: another set of numbers for the same calls
SOCKET_FAMILIES = (1, 2, 10, 16)  # AF_UNIX, AF_INET, AF_INET6 (no route: network namespace), AF_NETLINK
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
RET_KILL_PROCESS, RET_ALLOW, RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def landlock(sandbox_dir_fd: int, dev_null_fd: int) -> None:
    """Writes only beneath the program's directory and to /dev/null (both given as
    O_PATH descriptors, opened before the uid changed)."""
    abi = check(
        libc.syscall(
            LANDLOCK_CREATE_RULESET,
            None,
            ctypes.c_size_t(0),
            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
        ),
        "Landlock",
    )
    fs = sum(bits for version, bits in FS_WRITE_BY_ABI.items() if abi >= version)
    attr = RulesetAttr(
        fs, NET_TCP_BIND_CONNECT if abi >= 4 else 0, SCOPE_ABSTRACT_UNIX_SIGNAL if abi >= 6 else 0
    )
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # the struct grew with the ABI
    ruleset = check(
        libc.syscall(LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    for fd, rights in ((sandbox_dir_fd, fs), (dev_null_fd, fs & FS_FILE_RIGHTS)):
        rule = PathBeneathAttr(rights, fd)
        check(
            libc.syscall(
                LANDLOCK_ADD_RULE,
                ctypes.c_int(ruleset),
                ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            ),
            "landlock_add_rule",
        )
        os.close(fd)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    check(
        libc.syscall(LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
        "landlock_restrict_self",
    )
    os.close(ruleset)


def seccomp_program(machine: str) -> bytes:
    """A classic-BPF seccomp filter: other architectures' (and x32) syscalls kill the
    program; socket() of a family outside SOCKET_FAMILIES fails with EAFNOSUPPORT
    (AF_VSOCK reaches the hypervisor, and a network namespace does not cover it);
    io_uring fails with ENOSYS (its operations bypass seccomp); the keyring calls fail
    with EPERM (a uid's keyring outlives its processes). Everything else is allowed."""
    if machine not in SECCOMP_ARCH:
        raise OSError(0, f"seccomp: no filter for the {machine} architecture")
    a = SECCOMP_ARCH[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, JMP|JGE|K, BPF_RET|K
    # (code, k, jump-if-true label, jump-if-false label); labels resolve to offsets below
    prog: list[tuple] = [(ld, 4), (jeq, a["audit"], None, "kill"), (ld, 0)]
    if machine == "x86_64":
        prog.append((jge, X32_SYSCALL_BIT, "kill", None))
    prog.append((jeq, a["socket"], "socket", None))
    prog += [(jeq, nr, "enosys", None) for nr in IO_URING_SYSCALLS]
    prog += [(jeq, nr, "eperm", None) for nr in a["keys"]]
    prog.append((ret, RET_ALLOW))
    labels = {"socket": len(prog)}
    prog.append((ld, 16))  # args[0], low 32 bits (little-endian): the family, an int
    prog += [(jeq, family, "allow", None) for family in SOCKET_FAMILIES]
    prog.append((ret, RET_ERRNO | EAFNOSUPPORT))
    for name, k in (("allow", RET_ALLOW), ("enosys", RET_ERRNO | ENOSYS), ("eperm", RET_ERRNO | EPERM)):
        labels[name] = len(prog)
        prog.append((ret, k))
    labels["kill"] = len(prog)
    prog.append((ret, RET_KILL_PROCESS))
    out = b""
    for i, (code, k, *jumps) in enumerate(prog):
        jt, jf = (labels[j] - i - 1 if j else 0 for j in (jumps or (None, None)))
        out += struct.pack("=HBBI", code, jt, jf, k)
    return out


def seccomp() -> None:
    program = seccomp_program(os.uname().machine)
    fprog = SockFprog(len(program) // 8, program)
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


def mount_private_tmpfs(spec: dict, code: bytes) -> None:
    """In the launcher's new mount namespace: all mounts read-only and private, then a
    tmpfs of `disk_mb` MiB and `disk_files` inodes over the temporary directory, with
    the program's directory and main.py in it."""
    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, MS_PRIVATE, 0)
    check(
        libc.syscall(
            MOUNT_SETATTR,
            ctypes.c_int(AT_FDCWD),
            b"/",
            ctypes.c_uint(AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        "mount_setattr (read-only)",
    )
    limits = spec["limits"]
    # +2: the tmpfs root and the program's directory; main.py counts as one of its files
    options = f"size={limits['disk_mb']}m,nr_inodes={limits['disk_files'] + 2},mode=0711"
    check(
        libc.mount(b"tmpfs", spec["mount"].encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()),
        "mount tmpfs",
    )
    os.mkdir(spec["dir"], 0o700)
    path = os.path.join(spec["dir"], spec["program"])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with open(fd, "wb") as f:
        f.write(code)
    if spec["uid"] is not None:
        os.chown(path, spec["uid"], spec["uid"])


def set_limits(limits: dict) -> None:
    mib = 1 << 20
    for name, soft, hard in (
        # soft = hard: SIGKILL, which PID 1 of a namespace cannot ignore (unlike SIGXCPU)
        ("RLIMIT_CPU", limits["cpu_s"], limits["cpu_s"]),
        ("RLIMIT_AS", limits["memory_mb"] * mib, limits["memory_mb"] * mib),
        ("RLIMIT_NPROC", limits["processes"], limits["processes"]),
        ("RLIMIT_FSIZE", limits["file_mb"] * mib, limits["file_mb"] * mib),
        ("RLIMIT_NOFILE", limits["open_files"], limits["open_files"]),
        ("RLIMIT_CORE", 0, 0),
    ):
        resource.setrlimit(getattr(resource, name), (soft, hard))


def report(status_fd: int, **fields) -> None:
    os.write(status_fd, (json.dumps(fields) + "\n").encode())


def join_cgroup(spec: dict) -> None:
    """Into the program's cgroup, so that the program is born there. The caller has
    usually moved us already, while we started (a move waits for an RCU grace period:
    ~10 ms on cgroup v1); else we move ourselves ("0": the writer)."""
    with open("/proc/self/cgroup") as f:
        joined = f.read().count(f"/{spec['cgroup_name']}\n")
    if joined < len(spec["cgroup_procs"]):
        for path in spec["cgroup_procs"]:
            with open(path, "w") as f:
                f.write("0")


def run_program(spec: dict) -> None:
    """In the forked child (PID 1 of the new namespace): confine, then exec."""
    os.chdir(spec["dir"])
    # opened before the uid changes: the path to it may not be open to the program's uid
    dir_fd, null_fd = (os.open(p, os.O_PATH | os.O_CLOEXEC) for p in (spec["dir"], "/dev/null"))
    set_limits(spec["limits"])
    uid = spec["uid"]
    if uid is not None:  # the parent was root
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "pdeathsig")  # setuid cleared it
    landlock(dir_fd, null_fd)
    if spec["seccomp"]:
        seccomp()
    os.execve(spec["python"], [spec["python"], "-I", "-S", "-B", spec["program"], *spec["argv"]], spec["env"])


def main() -> None:
    spec = json.loads(sys.argv[1])
    # As root, each run gets its own uid, so that RLIMIT_NPROC counts only this program's
    # processes and concurrent programs cannot touch each other.
    spec["uid"] = spec["uid_base"] + os.getpid() if spec["uid_base"] is not None else None
    status_fd = spec["status_fd"]
    os.set_inheritable(status_fd, False)  # closed when the program is exec'd
    try:
        # The launcher dies with whoever started it; the program dies with the launcher.
        check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "pdeathsig")
        if os.getppid() != spec["parent"]:
            sys.exit(1)
        root = spec["uid"] is not None
        oom_adj = None
        if spec["cgroup_procs"]:  # before the namespaces: with the caller's credentials
            join_cgroup(spec)
            if root:  # root may keep the OOM killer off the launcher
                oom_adj = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        outer_uid, outer_gid = os.getuid(), os.getgid()
        flags = CLONE_NEWNET | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)
        flags |= (CLONE_NEWNS if spec["mount"] else 0) | (CLONE_NEWIPC if spec["ipc"] else 0)
        check(libc.unshare(flags), "unshare")
        if not root:  # keep our own ids inside (unmapped ids cannot own the tmpfs's files)
            for name, text in (
                ("setgroups", "deny"),
                ("uid_map", f"{outer_uid} {outer_uid} 1"),
                ("gid_map", f"{outer_gid} {outer_gid} 1"),
            ):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        if spec["mount"]:
            with open(spec["code_fd"], "rb") as f:
                mount_private_tmpfs(spec, f.read())
        # else the caller made the directory and main.py on the host
        if root:
            os.chown(spec["dir"], spec["uid"], spec["uid"])
        pid = os.fork()
    except OSError as e:
        report(status_fd, setup_error=str(e))
        sys.exit(125)
    if pid == 0:
        try:
            run_program(spec)
        except BaseException as e:  # report, never fall through into the launcher's code
            report(status_fd, setup_error=str(e))
        os._exit(125)
    if oom_adj is not None:  # set after the fork: the program keeps the usual 0
        try:  # needs CAP_SYS_RESOURCE; without it the OOM killer may pick the launcher,
            os.write(oom_adj, b"-1000")  # which ends the program too: a failed run either way
        except OSError:
            pass
        os.close(oom_adj)
    _, wait_status = os.waitpid(pid, 0)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    report(
        status_fd, returncode=os.waitstatus_to_exitcode(wait_status), cpu_s=usage.ru_utime + usage.ru_stime
    )


if __name__ == "__main__":
    main()
