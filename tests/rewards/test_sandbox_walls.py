"""The sandbox's walls against resources that escape per-process limits: disk space,
memory of all kinds and of all processes together, kernel objects that outlive the
program, host files' permissions, sibling programs, AF_VSOCK, and what a killed
trainer leaves behind.

Each hostile program is run twice: with every wall, where it must be contained and
leave the host as it was (its temporary directory, System V IPC objects, cgroups,
host files' modes); and with the one wall that stops it left out
(`sandbox._WALLS_OFF`), where the escape must happen, so each test can fail. As in
test_sandbox.py, a program prints "ok" once its attack worked, so it would score 1
against the expected output "ok" if the wall it hits were missing.

The cases that only escape for a normal user (host files it owns, its sibling
programs, an undeletable directory) run the scorer as `nobody` in a cgroup delegated
to it, as a cluster user's trainer would run.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from rlpost.rewards.base import Problem
from rlpost.rewards.components.code_tests import CodeTests
from rlpost.rewards.scoring import sandbox, sandbox_cgroup
from rlpost.rewards.scoring.sandbox import Limits, SandboxUnavailable, run_python
from tests.rewards.test_sandbox import processes_with


def _unavailable() -> str | None:
    if not os.path.exists("/proc/self/ns/net"):
        return "needs Linux"
    try:
        sandbox.check_available()
    except SandboxUnavailable as e:  # names the missing facility
        return str(e)
    return None


REASON = _unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the sandbox is unavailable here: {REASON}")
NOBODY = 65534
SCORING_DIR = Path(sandbox.__file__).parent
SYSTEM_PYTHON = "/usr/bin/python3"


def wait_gone(marker: str, timeout: float = 3.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def our_cgroups(pid: int | None = None) -> list[Path]:
    """The programs' cgroups this process (or `pid`) made that still exist."""
    _, parents = sandbox_cgroup._cgroup_parents()
    pattern = f"{sandbox_cgroup.CGROUP_PREFIX}{pid or os.getpid()}-*"
    return [d for parent in parents for d in parent.glob(pattern)]


def sysv_keys() -> set[int]:
    return {key for _, key, _, _ in sysv_objects()}


def sysv_objects() -> set[tuple[str, int, int, int]]:
    """(kind, key, id, creator uid) of the host's System V IPC objects."""
    found = set()
    for kind in ("shm", "msg", "sem"):
        header, *lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        cuid = header.split().index("cuid")
        found |= {(kind, int(f[0]), int(f[1]), int(f[cuid])) for f in map(str.split, lines)}
    return found


def programs_sysv_objects() -> set:
    """Those made by a program's uid: run as root, a program's uid is UID_BASE + a PID."""
    return {o for o in sysv_objects() if o[3] >= sandbox.UID_BASE or o[3] == NOBODY}


@pytest.fixture
def host(monkeypatch):
    """A fresh temporary directory for the sandbox (so that what a program leaves there
    can be seen), and the host checks every test ends with: no process of the program
    left, no cgroup left, nothing left in that directory."""
    tmp = tempfile.mkdtemp(prefix="rlpost-walls-")
    os.chmod(tmp, 0o711)  # as root the programs run as other uids beneath it
    monkeypatch.setattr(tempfile, "tempdir", tmp)
    marker = f"rlpost-hostile-{uuid.uuid4().hex}"
    state = {"tmp": tmp, "marker": marker, "leftover_ok": False}
    ipc_before = programs_sysv_objects()
    try:
        yield state
        assert wait_gone(marker) == [], "processes left behind"
        assert our_cgroups() == [], "cgroups left behind"
        assert programs_sysv_objects() <= ipc_before, "System V IPC objects left behind"
        if not state["leftover_ok"]:
            assert os.listdir(tmp) == [], "files left in the temporary directory"
    finally:
        sandbox._remove(tmp)


def expect_ok() -> Problem:
    return Problem(prompt="", answer="", meta={"tests": [{"output": "ok"}]})


def run(code: str, host: dict, off: tuple[str, ...] = (), score: bool = True, **limits):
    """The sandbox's result (with the walls in `off` left out) and, with every wall, the
    program's score with the code reward against the expected output "ok"."""
    lim = Limits(**{"cpu_s": 5, "wall_s": 10.0, **limits})
    sandbox._WALLS_OFF = frozenset(off)
    try:
        result = run_python(code, argv=[host["marker"]], limits=lim)
        value = CodeTests(lim, task=None)(code, expect_ok()) if score and not off else None
    finally:
        sandbox._WALLS_OFF = frozenset()
    return result, value


def escaped(result) -> bool:
    return result.ok and result.stdout == "ok\n"


# ---------------------------------------------------------------- disk


FALLOCATE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = {target}
# FALLOC_FL_KEEP_SIZE: 256 MiB of blocks, a file of size 0 (RLIMIT_FSIZE never sees it)
ret = libc.fallocate(fd, 1, ctypes.c_long(0), ctypes.c_long(256 << 20))
held = os.fstat(fd).st_blocks * 512
print('ok' if ret == 0 and held >= 256 << 20 else f'refused {{ctypes.get_errno()}} {{held}}')
"""

MANY_FILES = """
written = 0
try:
    for i in range(12):  # 12 x 3.5 MiB, each under the 4 MiB file limit
        with open(f'part{i}', 'wb') as f:
            f.write(b'x' * (7 << 19))
        written += 1
finally:
    print('ok' if written == 12 else f'wrote {written}')
"""

MANY_INODES = """
made = 0
try:
    for i in range(3000):
        open(f'f{i}', 'w').close()
        made += 1
finally:
    print('ok' if made == 3000 else f'made {made}')
"""

A_FILE = "os.open('reserved', os.O_CREAT | os.O_WRONLY, 0o600)"

DISK = {
    # on the host's disk the file-size limit misses it; with no file-size limit, only a disk limit stops it
    "fallocate": (FALLOCATE.format(target=A_FILE), {"file_mb": 1}),
    "fallocate_no_file_limit": (FALLOCATE.format(target=A_FILE), {"file_mb": 512}),
    # its stdin, a file on the host's disk and not in its tmpfs, through a writable descriptor
    "fallocate_stdin": (FALLOCATE.format(target="0"), {"file_mb": 1}),
    "many_files": (MANY_FILES, {"file_mb": 4, "disk_mb": 16}),
    "many_inodes": (MANY_INODES, {"disk_files": 100}),
}


@pytest.mark.parametrize("name", list(DISK))
def test_disk_is_a_size_and_inode_limited_tmpfs(name, host):
    code, limits = DISK[name]
    before = os.statvfs(host["tmp"])
    result, score = run(code, host, **limits)
    assert not escaped(result) and score == 0.0, result
    # ENOSPC from the tmpfs (or EFBIG: tmpfs checks the file-size limit on fallocate too;
    # EBADF: its stdin is read-only)
    assert result.stdout.startswith(("refused 28", "refused 27", "refused 9")) or result.limit == "disk", (
        result
    )
    after = os.statvfs(host["tmp"])
    assert (before.f_bfree - after.f_bfree) * after.f_frsize < 64 << 20  # host disk untouched (noise aside)


@pytest.mark.parametrize("name", list(DISK))
def test_disk_escapes_without_the_mount_wall(name, host):
    code, limits = DISK[name]
    result, _ = run(code, host, off=("mount",), **limits)
    assert escaped(result), result


# ---------------------------------------------------------------- memory

FORKED = """
import os, time
for _ in range(6):  # 6 x 60 MiB, each process under its own 100 MiB address-space limit
    if os.fork() == 0:
        held = b'x' * (60 << 20)
        time.sleep(0.5)
        os._exit(0)
for _ in range(6):
    os.wait()
print('ok')  # whatever happened to its children
"""

MEMFD = """
import os
fds = []
for i in range(20):  # 20 x 15 MiB in anonymous in-memory files: outside the address space
    fd = os.memfd_create(f'hold{i}')
    os.write(fd, b'x' * (15 << 20))
    fds.append(fd)
print('ok')
"""

SYSV_SHM = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
for _ in range(4):  # 4 x 80 MiB of System V shared memory, each detached once filled
    shmid = libc.shmget(0, ctypes.c_size_t(80 << 20), 0o1600)  # IPC_PRIVATE, IPC_CREAT
    addr = libc.shmat(shmid, None, 0)
    ctypes.memset(addr, 1, 80 << 20)
    libc.shmdt(ctypes.c_void_p(addr))
print('ok')
"""

MEMORY = {"forked": FORKED, "memfd": MEMFD, "sysv_shm": SYSV_SHM}


@pytest.mark.parametrize("name", list(MEMORY))
def test_memory_of_all_processes_and_kinds_is_limited(name, host):
    result, score = run(MEMORY[name], host, memory_mb=100)
    assert result.limit == "memory" and not result.ok, result  # killed or refused by the cgroup
    assert score == 0.0


@pytest.mark.parametrize("name", list(MEMORY))
def test_memory_escapes_without_the_cgroup_wall(name, host):
    result, _ = run(MEMORY[name], host, off=("cgroup",), memory_mb=100)
    assert escaped(result), result


# ---------------------------------------------------------------- kernel objects

SYSV_OBJECTS = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
key = int(sys.argv[2])
made = [libc.shmget(key, ctypes.c_size_t(1 << 20), 0o1600), libc.msgget(key + 1, 0o1600),
        libc.semget(key + 2, 4, 0o1600)]
print('ok' if min(made) >= 0 else f'refused {made}')
"""


def remove_sysv(key: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for get, ctl, args in (
        (libc.shmget, libc.shmctl, (key, ctypes.c_size_t(0), 0)),
        (libc.msgget, libc.msgctl, (key + 1, 0)),
        (libc.semget, libc.semctl, (key + 2, 0, 0)),
    ):
        ident = get(*args)
        if ident >= 0:
            ctl(ident, 0, None) if ctl is not libc.semctl else ctl(ident, 0, 0)  # IPC_RMID


@pytest.mark.parametrize("wall", [True, False], ids=["contained", "escapes_without_ipc_namespace"])
def test_sysv_objects_die_with_the_program(wall, host):
    key = int.from_bytes(os.urandom(3), "little") * 4 + 0x10000000
    sandbox._WALLS_OFF = frozenset() if wall else frozenset({"ipc"})
    try:
        result = run_python(
            SYSV_OBJECTS, argv=[host["marker"], str(key)], limits=Limits(cpu_s=5, wall_s=10.0)
        )
        assert result.stdout == "ok\n", result  # it made them
        left = {key, key + 1, key + 2} & sysv_keys()
        assert left == (set() if wall else {key, key + 1, key + 2})
    finally:
        sandbox._WALLS_OFF = frozenset()
        remove_sysv(key)
    assert not {key, key + 1, key + 2} & sysv_keys()


KEYRING = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
# add_key("user", ..., KEY_SPEC_USER_KEYRING): the uid's keyring outlives its processes
key = libc.syscall(248 if os.uname().machine == 'x86_64' else 217, b'user', b'rlpost-hostile', b'x' * 512,
                   ctypes.c_size_t(512), ctypes.c_int(-4))
print('ok' if key >= 0 else f'refused {ctypes.get_errno()}', os.getuid())
"""


def key_users() -> dict[int, str]:
    lines = Path("/proc/key-users").read_text().splitlines()
    return {int(line.split(":")[0]): line for line in lines}


def clear_keyring(uid: int) -> None:
    """Invalidate the uid's user and user-session keyrings, by id (naming them by their
    special ids again would make them anew)."""
    script = (
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "ids = [libc.syscall(250, 0, ctypes.c_int(ring), 0) for ring in (-4, -5)]\n"  # KEYCTL_GET_KEYRING_ID
        "for i in ids:\n    libc.syscall(250, 21, ctypes.c_int(i))\n"  # KEYCTL_INVALIDATE
    )
    subprocess.run([SYSTEM_PYTHON, "-c", script], user=uid, group=uid, extra_groups=[], check=True)
    deadline = time.monotonic() + 2  # the key collector runs asynchronously
    while uid in key_users() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/proc/key-users"), reason="needs root and keyrings"
)
@pytest.mark.parametrize("wall", [True, False], ids=["contained", "escapes_without_seccomp"])
def test_keyrings_refused(wall, host):
    """Without the wall the program's uid keeps a keyring after it exits; the test
    invalidates it, but the kernel keeps 8 bytes of root's key quota (the link from
    its register of user keyrings) per escape shown."""
    result, score = run(KEYRING, host, off=() if wall else ("seccomp",))
    verdict, *_, uid = result.stdout.split()
    try:
        if wall:
            assert result.stdout.startswith("refused 1 ") and int(uid) not in key_users(), result  # EPERM
            assert score == 0.0
        else:
            assert verdict == "ok" and int(uid) in key_users(), result  # left in the kernel
    finally:
        if int(uid) in key_users():
            clear_keyring(int(uid))
    assert int(uid) not in key_users()


# ---------------------------------------------------------------- AF_VSOCK and io_uring


def vsock_in_kernel() -> bool:
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
        return True
    except (AttributeError, OSError):
        return False


VSOCK = """
import socket
try:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)  # a line to the hypervisor (CID 2)
    s.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
    print('ok')
except OSError as e:
    print('refused', e.errno)
"""

IO_URING = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)  # struct io_uring_params
fd = libc.syscall(425, 4, params)  # io_uring_setup: its operations (sockets too) bypass seccomp
print('ok' if fd >= 0 else f'refused {ctypes.get_errno()}')
"""


@pytest.mark.skipif(not vsock_in_kernel(), reason="this kernel has no AF_VSOCK")
@pytest.mark.parametrize("wall", [True, False], ids=["contained", "escapes_without_seccomp"])
def test_vsock_refused(wall, host):
    result, score = run(VSOCK, host, off=() if wall else ("seccomp",))
    if wall:
        assert result.stdout == "refused 97\n" and score == 0.0, result  # EAFNOSUPPORT
    else:
        assert escaped(result), result


def io_uring_enabled() -> bool:
    path = Path("/proc/sys/kernel/io_uring_disabled")
    return os.uname().machine == "x86_64" and (not path.exists() or path.read_text().strip() == "0")


@pytest.mark.skipif(not io_uring_enabled(), reason="io_uring is disabled here (or not x86_64)")
@pytest.mark.parametrize("wall", [True, False], ids=["contained", "escapes_without_seccomp"])
def test_io_uring_refused(wall, host):
    result, _ = run(IO_URING, host, off=() if wall else ("seccomp",), score=False)
    assert (result.stdout == "refused 38\n") if wall else escaped(result), result  # ENOSYS


# ---------------------------------------------------------------- a killed trainer

TRAINER = """
import sys
sys.path[:0] = {path!r}
from rlpost.rewards.scoring import sandbox
sandbox._WALLS_OFF = frozenset({off!r})
sandbox.run_python("import time\\nopen('evidence', 'w').write('x')\\ntime.sleep(60)", argv=[{marker!r}],
                   limits=sandbox.Limits(wall_s=60.0, cpu_s=60))
"""


@pytest.mark.parametrize("wall", [True, False], ids=["contained", "left_without_the_mount_wall"])
def test_killed_trainer_leaves_nothing(wall, host, monkeypatch):
    code = TRAINER.format(path=sys.path, off=() if wall else ("mount",), marker=host["marker"])
    env = {**os.environ, "TMPDIR": host["tmp"]}
    trainer = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 20
    while not processes_with(host["marker"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(host["marker"]), "the program did not start"
    time.sleep(0.3)
    # its tmpfs is in its own mount namespace only: nothing propagated to ours
    assert host["tmp"] not in Path("/proc/self/mountinfo").read_text()
    trainer.kill()  # kill -9 mid-program
    trainer.wait()
    assert wait_gone(host["marker"]) == []  # the launcher and program die with it
    left = os.listdir(host["tmp"])
    if wall:
        assert left == []
    else:
        assert left and left[0].startswith("rlpost-sandbox-")
        host["leftover_ok"] = True
    # its empty cgroups stay until a later process sweeps those of dead processes
    stale = our_cgroups(trainer.pid)
    assert stale
    monkeypatch.setattr(sandbox_cgroup, "CGROUP_STALE_S", 0.0)
    deadline = time.monotonic() + 5  # the orphaned launcher holds its cgroup until init reaps it
    while our_cgroups(trainer.pid) and time.monotonic() < deadline:
        sandbox_cgroup._sweep(sandbox_cgroup._cgroup_parents()[1])
        time.sleep(0.05)
    assert our_cgroups(trainer.pid) == []


# ---------------------------------------------------------------- a normal user's trainer

NONROOT_SCORER = """
import importlib, json, sys, threading, types
# the sandbox's modules from their folder, under their own names: the system's Python has
# neither rlpost installed nor the dependencies of the rest of it
for name, path in (("rlpost", []), ("rlpost.rewards", []), ("rlpost.rewards.scoring", [sys.argv[1]])):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = path
sb = importlib.import_module("rlpost.rewards.scoring.sandbox")
sb._WALLS_OFF = frozenset(json.loads(sys.argv[2]))
programs = json.loads(sys.argv[3])
results = [None] * len(programs)
def one(i, delay):
    import time
    time.sleep(delay)
    r = sb.run_python(programs[i][0], argv=[programs[i][1]], limits=sb.Limits(wall_s=10.0))
    results[i] = [r.stdout, r.stderr, r.returncode, r.limit]
threads = [threading.Thread(target=one, args=(i, 0.2 * i)) for i in range(len(programs))]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
"""


@pytest.fixture
def nobody(tmp_path):
    """Runs programs from a scorer process running as `nobody`, in memory and pids cgroups
    delegated to it (as root on cgroup v1 here: made, chowned, and joined before the uid
    changes), with its own temporary directory."""
    if os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs root (to become nobody) and {SYSTEM_PYTHON}")
    version, parents = sandbox_cgroup._cgroup_parents()
    if version != 1:
        pytest.skip("delegating a cgroup to nobody is done here for cgroup v1 only")
    name = f"rlpost-walls-nobody-{uuid.uuid4().hex[:8]}"
    delegated = [parent / name for parent in parents]
    for directory in delegated:
        directory.mkdir()
        for path in (directory, *directory.iterdir()):
            os.chown(path, NOBODY, NOBODY)
    tmp = tempfile.mkdtemp(prefix="rlpost-walls-nobody-")
    os.chown(tmp, NOBODY, NOBODY)

    def join_then_drop():
        for directory in delegated:
            (directory / "cgroup.procs").write_text(str(os.getpid()))
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    def score(programs: list[str], off: tuple[str, ...] = ()) -> list:
        marker = f"rlpost-hostile-{uuid.uuid4().hex}"
        args = [json.dumps(list(off)), json.dumps([[p, marker] for p in programs])]
        out = subprocess.run(
            [SYSTEM_PYTHON, "-I", "-c", NONROOT_SCORER, str(SCORING_DIR), *args],
            preexec_fn=join_then_drop,
            env={"PATH": "/usr/bin:/bin", "TMPDIR": tmp},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert wait_gone(marker) == []
        return json.loads(out.stdout)

    score.tmp = tmp
    try:
        yield score
    finally:
        for directory in delegated:
            for child in directory.glob(sandbox_cgroup.CGROUP_PREFIX + "*"):
                sandbox_cgroup._rmdir(child, wait_s=2.0)
            leftover = [c.name for c in directory.iterdir() if c.is_dir()]
            sandbox_cgroup._rmdir(directory, wait_s=2.0)
            assert leftover == [], "cgroups left behind"
        sandbox._remove(tmp)


CHMOD = """
import os
victim = {victim!r}  # a file of its user's, outside its directory
done = []
for attempt in (lambda: os.chmod(victim, 0o777), lambda: os.utime(victim, (0, 0))):
    try:
        attempt()
        done.append(1)
    except OSError as e:
        print('refused', e.errno)
if len(done) == 2:
    print('ok')
"""


@pytest.mark.parametrize("wall", [True, False], ids=["contained", "escapes_without_the_mount_wall"])
def test_host_files_of_its_user_keep_their_modes(wall, nobody, tmp_path):
    outside = Path(tempfile.mkdtemp(prefix="rlpost-walls-victim-"))
    try:
        outside.chmod(0o755)
        victim = outside / "checkpoint.json"
        victim.write_text("{}")
        os.chown(victim, NOBODY, NOBODY)
        victim.chmod(0o644)
        before = victim.stat()
        [(stdout, stderr, _, _)] = nobody([CHMOD.format(victim=str(victim))], off=() if wall else ("mount",))
        after = victim.stat()
        if wall:
            assert stdout == "refused 30\nrefused 30\n", stderr  # EROFS
            assert (after.st_mode, after.st_mtime) == (before.st_mode, before.st_mtime)
        else:
            assert stdout == "ok\n" and stat.S_IMODE(after.st_mode) == 0o777, stderr
    finally:
        sandbox._remove(str(outside))
    assert os.listdir(nobody.tmp) == []


UNDELETABLE = """
import os
os.mkdir('locked')
open('locked/f', 'w').write('x')
os.chmod('locked', 0o500)
os.chmod('.', 0)
print('ok')
"""


@pytest.mark.parametrize("wall", [True, False], ids=["contained", "left_without_the_mount_wall"])
def test_its_directory_cannot_outlive_it(wall, nobody):
    [(stdout, stderr, _, _)] = nobody([UNDELETABLE], off=() if wall else ("mount",))
    assert stdout == "ok\n", stderr  # it did lock its directory
    left = os.listdir(nobody.tmp)
    assert left == [] if wall else left[0].startswith("rlpost-sandbox-")


HONEST = "import time\ntime.sleep(1.5)\nprint('ok')"
COPYCAT = """
import glob, os, time
mine = os.path.realpath('main.py')
deadline = time.time() + 1.5
while time.time() < deadline:
    # beside its own directory, or through another process's working directory
    beside = glob.glob(os.path.join(os.path.dirname(os.getcwd()), '*', 'main.py'))
    for path in beside + glob.glob('/proc/*/cwd/main.py'):
        try:
            if os.path.realpath(path) != mine:
                source = open(path).read()
                break
        except OSError:
            pass
    else:
        time.sleep(0.05)
        continue
    exec(source)  # the sibling sample's program, and so its answer
    raise SystemExit
print('nothing found')
"""


@pytest.mark.parametrize("wall", [True, False], ids=["contained", "escapes_without_the_mount_wall"])
def test_cannot_read_or_run_a_sibling_program(wall, nobody):
    honest, copycat = nobody([HONEST, COPYCAT], off=() if wall else ("mount",))
    assert honest[0] == "ok\n", honest
    assert copycat[0] == ("nothing found\n" if wall else "ok\n"), copycat


# ---------------------------------------------------------------- refusing rather than degrading


def test_refuses_without_a_cgroup(monkeypatch):
    def none():
        raise SandboxUnavailable("no cgroup hierarchy with the memory and pids controllers is mounted")

    monkeypatch.setattr(sandbox_cgroup, "_cgroup_parents", none)
    with pytest.raises(SandboxUnavailable, match="memory and pids"):
        run_python("print('ok')")


def test_refuses_when_its_tmpfs_cannot_be_mounted(host):
    with pytest.raises(SandboxUnavailable, match="mount tmpfs"):
        run_python("print('ok')", limits=Limits(disk_files=10**30))  # more inodes than tmpfs takes


def mountinfo_line(point: Path, fstype: str, options: str) -> str:
    return f"30 1 0:26 / {point} rw,nosuid - {fstype} cgroup {options}"


def test_finds_a_cgroup_v2_parent(tmp_path):
    """The v2 choice on a stand-in hierarchy (this machine's memory controller is on v1)."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    info = mountinfo_line(tmp_path, "cgroup2", "rw")
    assert sandbox_cgroup._find_cgroup_parents(info, "0::/\n", None) == (2, (tmp_path,))
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids"  # enabled for children
    delegated = tmp_path / "user.slice" / "sandboxes"
    delegated.mkdir(parents=True)
    (delegated / "cgroup.subtree_control").write_text("memory pids\n")
    assert sandbox_cgroup._find_cgroup_parents(info, "0::/user.slice/trainer\n", "/user.slice/sandboxes") == (
        2,
        (delegated,),
    )


def test_finds_cgroup_v1_parents_and_prefers_v2_only_with_its_controllers(tmp_path):
    unified, memory, pids = (tmp_path / n for n in ("unified", "memory", "pids"))
    for d in (unified, memory / "job", pids):
        d.mkdir(parents=True)
    (unified / "cgroup.controllers").write_text("hugetlb\n")  # hybrid: memory and pids are on v1
    info = "\n".join(
        [
            mountinfo_line(unified, "cgroup2", "rw"),
            mountinfo_line(memory, "cgroup", "rw,memory"),
            mountinfo_line(pids, "cgroup", "rw,pids"),
        ]
    )
    own = "8:pids:/\n4:memory:/job\n0::/\n"
    assert sandbox_cgroup._find_cgroup_parents(info, own, None) == (1, (memory / "job", pids))
    with pytest.raises(SandboxUnavailable, match="memory and pids"):
        sandbox_cgroup._find_cgroup_parents(mountinfo_line(unified, "cgroup2", "rw"), own, None)
