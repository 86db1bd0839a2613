"""Running an untrusted Python program (model-written code) with limits, in isolation.

`run_python(code, stdin, argv, limits)` starts the program through
`sandbox_launcher.py` (read it for the exact steps), in a cgroup made by
`sandbox_cgroup.py`. Each wall, what it stops, what it does not, and what it needs:

- Resource limits (setrlimit), per process: CPU seconds (SIGKILL), address space
  (allocations fail: MemoryError), processes and threads of the program's uid
  (fork fails), file size (writes fail: EFBIG), open files, no core dumps. The
  wall-clock limit and the cap on captured stdout/stderr are enforced here: the
  launcher's process group is killed.
- A cgroup per program (v2, or the v1 memory and pids controllers): a memory limit
  (`memory_mb`) over all its processes together and all kinds of memory (heap,
  memfd_create files, System V shared memory, its tmpfs files, the kernel memory
  charged to it); no swap; a pids limit (`processes`) over all its tasks. Going
  over memory gets a process OOM-killed (or an allocation refused), and then the
  run fails (`limit="memory"`) whatever it printed. Needs root or a delegated
  cgroup: on v1, our own memory and pids cgroups writable (the programs' are made
  beneath them); on v2, `$RLPOST_SANDBOX_CGROUP` (a cgroup this user may write,
  holding no processes, with memory and pids available), else the hierarchy's
  root (root only). The launcher is moved in (it counts as one of the tasks) while
  it starts up, which hides the wait of a cgroup move (~10 ms on v1: an RCU grace
  period). A killed trainer leaves its empty cgroups; the next process to run a
  program removes those of dead processes.
- A mount namespace: every mount read-only (so no chmod, chown, utime, write or
  fallocate on any host file, whoever owns it), and the temporary directory
  covered by a tmpfs of `disk_mb` MiB and `disk_files` inodes holding the program's
  directory (its cwd, the only place it may write) and main.py; its stdin is a
  read-only descriptor. Nothing is written to the host's disk, nothing is left
  there when anything is killed (the tmpfs dies with the namespace), concurrent
  programs cannot see each other's files, and the host's temporary directory is
  hidden from the program. Needs mount_setattr (kernel 5.12+); as a normal user,
  a user namespace.
- An IPC namespace: System V shared memory, message queues and semaphores and
  POSIX message queues the program makes die with it.
- A new PID namespace whose PID 1 is the program: it cannot see or signal host
  processes by PID (`os.getppid()` is 0 there), and when it exits or is killed
  the kernel kills everything it forked, daemons and new sessions included. The
  launcher and the program die when the caller's process does (PR_SET_PDEATHSIG).
- A new network namespace: no interface but a loopback that is down, so no
  TCP/UDP to the host or anywhere else, and no abstract UNIX sockets of the host.
  Pathname UNIX sockets are files: reachable only where the uid may write them.
- Landlock (unprivileged Linux LSM, kernel 5.13+): writes, creations, removals
  and renames only under the program's directory (and /dev/null); denies reading
  other processes' memory, /proc/<pid>/environ, /proc/<pid>/root (ptrace scoping);
  on ABI 4+ (kernel 6.7+) no TCP bind/connect; on ABI 6+ (6.12+) no signals to,
  and no abstract UNIX sockets of, processes outside the sandbox. Reads are NOT
  restricted: the program can read any file its uid can read outside the
  temporary directory (it has no network to send it anywhere, but it can print
  it into its output).
- seccomp (a classic BPF filter installed with prctl, no library; x86_64 and
  aarch64; kernel 4.14+): socket() only for UNIX, IPv4, IPv6 and netlink (AF_VSOCK
  reaches the hypervisor, and no namespace covers it), no io_uring (its operations
  would bypass the filter), no kernel keyrings (run as root, a program's uid keeps
  its keyring after it exits), no 32-bit or x32 syscalls.
- Identity: run as root, the program gets its own unprivileged uid (root ignores
  RLIMIT_NPROC and may write and signal everything); as a normal user it keeps
  its uid inside a new user namespace (no capabilities outside it, none inside
  once it runs). Either way no_new_privs is set.
- A minimal environment (PATH, LANG only) and `python -I -S -B`: no inherited
  variables, no site-packages (the standard library only), no user site.

Not covered: host process listings and command lines in /proc stay readable;
CPU time is per process (a program that forks gets `processes` x `cpu_s` within
`wall_s`); CPU and memory bandwidth are shared (a program can slow its
neighbours until its limits end it); kernel vulnerabilities. Every wall is
required: without one (not Linux, unprivileged user namespaces disabled for a
normal user, Landlock absent, no usable cgroup, swap on without a swap limit,
kernel before 5.13, another architecture) `run_python` raises `SandboxUnavailable`
instead of running the program with fewer walls. Tested on Linux 6.18 (Landlock
ABI 7, cgroup v1 memory and pids), as root and as an unprivileged user with a
delegated cgroup (tests/rewards/test_sandbox_walls.py); the cgroup v2 code only on
a stand-in directory tree.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlpost.rewards.scoring.sandbox_cgroup import Cgroup
from rlpost.rewards.scoring.sandbox_errors import SandboxUnavailable

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
# Run as root, the program's uid is this plus the launcher's PID: unique among live programs.
UID_BASE = 1_000_000_000
WALLS = frozenset({"cgroup", "mount", "ipc", "seccomp"})  # the ones a test can leave out
# Tests only: walls to leave out, to show that the hostile program each one stops escapes
# without it (so that its test can fail). Never set it anywhere else.
_WALLS_OFF: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5
    wall_s: float = 5.0
    memory_mb: int = 512  # per process (address space) and for all processes together (cgroup)
    processes: int = 16  # processes and threads of the program
    file_mb: int = 16  # per file
    disk_mb: int = 64  # all the program's files together (they are in memory: memory_mb counts them)
    disk_files: int = 1024  # files and directories the program may make
    open_files: int = 64
    output_bytes: int = 1 << 20  # per stream

    # read by pydantic when a config validates these fields (`reward.components.*.args`)
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    # the program's exit status, negative for a signal; None when the sandbox killed it
    returncode: int | None
    timed_out: bool
    # which limit ended or crippled the run: wall_time, output, cpu_time, memory, file_size, disk
    limit: str | None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.limit is None


def run_python(
    code: str, stdin: str = "", argv: tuple[str, ...] | list[str] = (), limits: Limits = Limits()
) -> SandboxResult:
    """Run `code` as a Python program with `stdin` and `argv` in a fresh directory."""
    if sys.platform != "linux":
        raise SandboxUnavailable("the code sandbox needs Linux (namespaces, cgroups and Landlock)")
    walls = WALLS - _WALLS_OFF
    deadline = time.monotonic() + limits.wall_s
    python = program_interpreter()
    # With the mount wall the directory exists only inside the program's mount namespace,
    # on a tmpfs covering the temporary directory; without it, on the host, as before.
    cover = os.path.realpath(tempfile.gettempdir()) if "mount" in walls else None
    if cover:
        _check_not_covered(python, cover)
    cgroup = Cgroup(limits) if "cgroup" in walls else None
    if cover:
        sandbox_dir = os.path.join(cover, f"rlpost-sandbox-{secrets.token_hex(6)}")
        host_dir = None
    else:
        try:
            sandbox_dir = host_dir = tempfile.mkdtemp(prefix="rlpost-sandbox-")
            Path(host_dir, "main.py").write_text(code)
        except BaseException:
            if cgroup:
                cgroup.remove()
            raise
    status_r, status_w = os.pipe()
    try:
        with tempfile.TemporaryFile() as stdin_file, tempfile.TemporaryFile() as code_file:
            stdin_file.write(stdin.encode())
            stdin_file.flush()
            stdin_fd = stdin_file.fileno()
            if cover:  # read-only: through a writable descriptor it could grow the file on the
                # host's disk (fallocate), past the file-size limit and outside its tmpfs
                stdin_fd = os.open(f"/proc/self/fd/{stdin_fd}", os.O_RDONLY | os.O_CLOEXEC)
            else:
                stdin_file.seek(0)
            code_file.write(code.encode())
            code_file.seek(0)
            spec = {
                "python": python,
                "program": "main.py",
                "argv": list(argv),
                "dir": sandbox_dir,
                "mount": cover,
                "code_fd": code_file.fileno() if cover else None,
                "ipc": "ipc" in walls,
                "seccomp": "seccomp" in walls,
                "cgroup_procs": cgroup.procs if cgroup else [],
                "cgroup_name": cgroup.name if cgroup else None,
                "env": ENV,
                "limits": asdict(limits),
                "parent": os.getpid(),
                "status_fd": status_w,
                "uid_base": UID_BASE if os.geteuid() == 0 else None,
            }
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", str(LAUNCHER), json.dumps(spec)],
                    cwd=host_dir or "/",
                    env=ENV,
                    stdin=stdin_fd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    pass_fds=(status_w, code_file.fileno()) if cover else (status_w,),
                )
            finally:
                if stdin_fd != stdin_file.fileno():
                    os.close(stdin_fd)
            if cgroup:  # now, while the launcher starts up: the move waits (its join_cgroup)
                cgroup.enter(proc.pid)
        os.close(status_w)
        status_w = -1
        try:
            out, err, stopped = _collect(proc, limits.output_bytes, deadline)
        finally:
            if proc.returncode is None:  # not reaped yet, so its PID (the group's id) is ours
                _kill_group(proc.pid)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        status = _read_status(status_r)
        oom_kills = cgroup.oom_kills() if cgroup else 0
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        if cgroup:
            cgroup.remove()
        if host_dir:
            _remove(host_dir)
    if "setup_error" in status:
        raise SandboxUnavailable(f"sandbox setup failed: {status['setup_error']}")
    stdout, stderr = (b.decode("utf-8", "replace") for b in (out, err))
    returncode = None if stopped else status.get("returncode")
    limit = stopped or (
        "memory" if oom_kills else _limit_hit(returncode, status.get("cpu_s", 0.0), stderr, limits)
    )
    return SandboxResult(stdout, stderr, returncode, stopped == "wall_time", limit)


def check_available() -> None:
    """Raise SandboxUnavailable unless a trivial program runs in the sandbox."""
    result = run_python("print('ok')")
    if result.stdout != "ok\n":
        raise SandboxUnavailable(f"a trivial program failed in the sandbox: {result}")


@functools.cache
def program_interpreter() -> str:
    """This interpreter, unless we are root and the program's uid could not reach it
    (e.g. a pyenv install under /root): then the system's python3."""
    if os.geteuid() != 0:
        return sys.executable
    own = os.path.realpath(sys.executable)
    if _others_can_enter(Path(own)) and _others_can_enter(Path(os.__file__).parent):
        return own
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system and _others_can_enter(Path(os.path.realpath(system))):
        return os.path.realpath(system)
    raise SandboxUnavailable(
        f"running as root and no Python interpreter is usable by an unprivileged uid ({own} is not)"
    )


def _check_not_covered(python: str, cover: str) -> None:
    """The program's interpreter must not lie under the temporary directory, which the
    program's tmpfs covers."""
    paths = {python, os.path.realpath(python)}
    if python == sys.executable:
        paths.add(os.path.dirname(os.path.realpath(os.__file__)))  # its standard library
    for path in paths:
        if path == cover or path.startswith(cover.rstrip("/") + "/"):
            raise SandboxUnavailable(
                f"the program's interpreter ({path}) lies under the temporary directory {cover}, "
                "which the sandbox covers with the program's own tmpfs: set TMPDIR to another directory"
            )


def _others_can_enter(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def _collect(proc: subprocess.Popen, cap: int, deadline: float) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr until the program ends; stop early at the deadline or
    when a stream exceeds `cap` bytes. Returns (stdout, stderr, why it was stopped)."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    stopped = None
    with selectors.DefaultSelector() as sel:
        for stream in bufs:
            sel.register(stream, selectors.EVENT_READ)
        while sel.get_map() and not stopped:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "wall_time"
                break
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                bufs[key.fileobj] += data
                if len(bufs[key.fileobj]) > cap:
                    stopped = "output"
    if not stopped:  # both streams closed; the program may still run without them
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped = "wall_time"
    return bytes(bufs[proc.stdout][:cap]), bytes(bufs[proc.stderr][:cap]), stopped


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_status(fd: int) -> dict:
    """The launcher's JSON lines, merged (it has exited, so this does not block)."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    except BlockingIOError:  # a killed program may hold the other end for a moment
        pass
    status: dict = {}
    for line in data.decode(errors="replace").splitlines():
        try:
            status.update(json.loads(line))
        except json.JSONDecodeError:
            pass
    return status


def _limit_hit(returncode: int | None, cpu_s: float, stderr: str, limits: Limits) -> str | None:
    # rusage rounds the CPU time the kernel killed it at slightly down (0.994 s for 1 s)
    if returncode == -signal.SIGKILL and cpu_s >= 0.95 * limits.cpu_s:
        return "cpu_time"
    if returncode:  # Python turns the other limits into exceptions; read the last one
        last = stderr.rstrip().rsplit("\n", 1)[-1]
        if last.startswith("MemoryError") or "[Errno 12]" in last:  # ENOMEM
            return "memory"
        if "[Errno 27]" in last:  # EFBIG
            return "file_size"
        if "[Errno 28]" in last:  # ENOSPC: its tmpfs is full (bytes or inodes)
            return "disk"
    return None


def _remove(path: str) -> None:
    """rmtree that also removes what the program made unreadable (chmod 000)."""
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            if not os.path.islink(os.path.join(root, d)):
                os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)
