"""Starts one untrusted program for rlpost.rewards.scoring.sandbox: a script, not a module.

Run as `python -I -S sandbox_launcher.py SPEC_JSON` in a new session, so it
imports the standard library only. It is trusted; the program is not. It
  1. moves its future children into new network and PID namespaces (and a new
     user namespace when not root, which is what lets a normal user do that);
  2. forks the program, which becomes PID 1 of the new PID namespace: when it
     exits or is killed, the kernel kills everything it forked;
  3. in that child: resource limits, an unprivileged uid when running as root
     (root ignores RLIMIT_NPROC and owns every root file), no-new-privileges, a
     Landlock ruleset (writes only under the sandbox directory; no TCP; when the
     kernel has them: no signals or abstract UNIX sockets to anything outside),
     then exec of a fresh interpreter on the program;
  4. waits for it and writes {"returncode", "cpu_s"} as a JSON line to the
     status pipe; a failed setup step writes {"setup_error": ...} there first.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SIGKILL = 9
# Landlock syscall numbers are the same on every architecture (added after the unification).
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
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


def check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def landlock(sandbox_dir: str) -> None:
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
    for path, rights in ((sandbox_dir, fs), ("/dev/null", fs & FS_FILE_RIGHTS)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneathAttr(rights, fd)
        check(
            libc.syscall(
                LANDLOCK_ADD_RULE,
                ctypes.c_int(ruleset),
                ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            ),
            f"landlock_add_rule {path}",
        )
        os.close(fd)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    check(
        libc.syscall(LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
        "landlock_restrict_self",
    )
    os.close(ruleset)


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


def run_program(spec: dict) -> None:
    """In the forked child (PID 1 of the new namespace): confine, then exec."""
    set_limits(spec["limits"])
    uid = spec["uid"]
    if uid is not None:  # the parent was root
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "pdeathsig")  # setuid cleared it
    landlock(spec["dir"])
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
        flags = CLONE_NEWNET | CLONE_NEWPID | (0 if spec["uid"] is not None else CLONE_NEWUSER)
        check(libc.unshare(flags), "unshare")
        if spec["uid"] is not None:
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
    _, wait_status = os.waitpid(pid, 0)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    report(
        status_fd, returncode=os.waitstatus_to_exitcode(wait_status), cpu_s=usage.ru_utime + usage.ru_stime
    )


if __name__ == "__main__":
    main()
