"""Running an untrusted Python program (model-written code) with limits, in isolation.

`run_python(code, stdin, argv, limits)` writes the program to a fresh temporary
directory and starts it through `sandbox_launcher.py` (read it for the exact
steps). Each layer, what it stops, and what it does not:

- Resource limits (setrlimit): CPU seconds (SIGXCPU, then SIGKILL one second
  later), address space (allocations fail: MemoryError), processes and
  threads of the program's uid (fork fails), file size (writes fail: EFBIG),
  open files, no core dumps. The wall-clock limit and the cap on captured
  stdout/stderr are enforced here: the launcher's process group is killed.
- A new PID namespace whose PID 1 is the program: it cannot see or signal host
  processes by PID (`os.getppid()` is 0 there), and when it exits or is killed
  the kernel kills everything it forked, daemons and new sessions included. The
  launcher and the program die when the caller's process does (PR_SET_PDEATHSIG).
- A new network namespace: no interface but a loopback that is down, so no
  TCP/UDP to the host or anywhere else, and no abstract UNIX sockets of the host.
  Pathname UNIX sockets are files: reachable only where the uid may write them.
- Landlock (unprivileged Linux LSM, kernel 5.13+): writes, creations, removals
  and renames only under the sandbox directory (and /dev/null); denies reading
  other processes' memory or /proc/<pid>/environ (ptrace scoping); on ABI 4+
  (kernel 6.7+) no TCP bind/connect; on ABI 6+ (6.12+) no signals to, and no
  abstract UNIX sockets of, processes outside the sandbox. Reads are NOT
  restricted: the program can read any file its uid can read (it has no
  network to send it anywhere, but it can print it into its output).
- Identity: run as root, the program gets its own unprivileged uid (root ignores
  RLIMIT_NPROC and may write and signal everything); as a normal user it keeps
  the uid inside a new user namespace (no capabilities outside it). Either way
  no_new_privs is set.
- A minimal environment (PATH, LANG only) and `python -I -S -B`: no inherited
  variables, no site-packages (the standard library only), no user site.

Not covered: host process listings and command lines in /proc stay readable;
CPU and memory bandwidth are shared (a program can slow its neighbours until
its limits end it); kernel vulnerabilities. The namespaces and Landlock are
required: without them (not Linux, unprivileged user namespaces disabled, or
Landlock absent) `run_python` raises `SandboxUnavailable` instead of running
the program with fewer walls. Tested on Linux 6.18 with Landlock ABI 7, as root
and as an unprivileged user.
"""

from __future__ import annotations

import functools
import json
import os
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

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
# Run as root, the program's uid is this plus the launcher's PID: unique among live programs.
UID_BASE = 1_000_000_000


class SandboxUnavailable(RuntimeError):
    """This machine cannot provide the isolation the sandbox promises."""


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5
    wall_s: float = 5.0
    memory_mb: int = 512
    processes: int = 16  # processes and threads of the program's uid
    file_mb: int = 16
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
    # which limit ended or crippled the run: wall_time, output, cpu_time, memory, file_size
    limit: str | None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.limit is None


def run_python(
    code: str, stdin: str = "", argv: tuple[str, ...] | list[str] = (), limits: Limits = Limits()
) -> SandboxResult:
    """Run `code` as a Python program with `stdin` and `argv` in a fresh directory."""
    if sys.platform != "linux":
        raise SandboxUnavailable("the code sandbox needs Linux (namespaces and Landlock)")
    deadline = time.monotonic() + limits.wall_s
    sandbox_dir = tempfile.mkdtemp(prefix="rlpost-sandbox-")
    status_r, status_w = os.pipe()
    try:
        Path(sandbox_dir, "main.py").write_text(code)
        spec = {
            "python": program_interpreter(),
            "program": "main.py",
            "argv": list(argv),
            "dir": sandbox_dir,
            "env": ENV,
            "limits": asdict(limits),
            "parent": os.getpid(),
            "status_fd": status_w,
            "uid_base": UID_BASE if os.geteuid() == 0 else None,
        }
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode())
            stdin_file.seek(0)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(LAUNCHER), json.dumps(spec)],
                cwd=sandbox_dir,
                env=ENV,
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(status_w,),
            )
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
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        _remove(sandbox_dir)
    if "setup_error" in status:
        raise SandboxUnavailable(f"sandbox setup failed: {status['setup_error']}")
    stdout, stderr = (b.decode("utf-8", "replace") for b in (out, err))
    returncode = None if stopped else status.get("returncode")
    limit = stopped or _limit_hit(returncode, status.get("cpu_s", 0.0), stderr, limits)
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
        if last.startswith("MemoryError"):
            return "memory"
        if "[Errno 27]" in last:  # EFBIG
            return "file_size"
    return None


def _remove(path: str) -> None:
    """rmtree that also removes what the program made unreadable (chmod 000)."""
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            if not os.path.islink(os.path.join(root, d)):
                os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)
