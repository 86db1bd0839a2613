"""The code sandbox against hostile programs: each is contained, scores 0 with the code
reward, and leaves the host as it was (this process and its parent alive, nothing
written outside the sandbox, no process left behind).

Every hostile program prints "ok" once its attack worked, so each would score 1
against the expected output "ok" if the wall it hits were missing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rlpost.rewards.base import Problem
from rlpost.rewards.components.code_tests import CodeTests
from rlpost.rewards.scoring.sandbox import Limits, run_python

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/ns/net"), reason="needs Linux")


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            pass
    return found


@pytest.fixture
def marker():
    """A unique argv word for the program, so its processes can be found afterwards."""
    mark = f"rlpost-hostile-{uuid.uuid4().hex}"
    yield mark
    deadline = time.monotonic() + 2  # SIGKILLed processes may take a moment to be gone
    while processes_with(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(mark) == [], "processes left behind"


def expect_ok(*argv: str) -> Problem:
    return Problem(prompt="", answer="", meta={"tests": [{"output": "ok", "argv": list(argv)}]})


def run(code: str, marker: str, **limits) -> tuple:
    """The sandbox's result, its wall time, and the program's score with the code reward
    against the expected output "ok"."""
    lim = Limits(**{"cpu_s": 2, "wall_s": 3.0, **limits})
    t = time.monotonic()
    result = run_python(code, argv=[marker], limits=lim)
    elapsed = time.monotonic() - t
    score = CodeTests(lim, task=None)(f"```python\n{code}\n```", expect_ok(marker))
    return result, elapsed, score


def test_well_behaved_program_reads_stdin_and_argv(marker):
    result = run_python("import sys\nprint(sys.argv[1:], input().upper())", stdin="hello\n", argv=["a", "b"])
    assert result.ok and result.stdout == "['a', 'b'] HELLO\n" and result.stderr == ""
    assert CodeTests(Limits(), task=None)("print('ok')", expect_ok(marker)) == 1.0


def test_infinite_loop_stopped_by_cpu_limit(marker):
    result, _, score = run("print('ok', flush=True)\nwhile True: pass", marker, cpu_s=1, wall_s=30.0)
    assert result.limit == "cpu_time" and not result.timed_out  # not the wall limit
    assert score == 0.0


def test_sleeping_forever_stopped_by_wall_limit(marker):
    result, elapsed, score = run("import time\nprint('ok', flush=True)\ntime.sleep(60)", marker, wall_s=1.0)
    assert result.timed_out and result.limit == "wall_time" and result.returncode is None
    assert 1.0 <= elapsed < 5
    assert score == 0.0


def test_process_limit_caps_forks(marker):
    code = """
import os, time
forked = 0
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    forked += 1
print('ok' if forked == 40 else f'forked {forked}')
"""
    result, _, score = run(code, marker, processes=8)
    assert result.stdout.startswith("forked ") and int(result.stdout.split()[1]) < 8
    assert score == 0.0  # the sleeping children died with the program (see the fixture)


def test_fork_bomb_contained(marker):
    code = """
import os, time
for _ in range(12):  # at most 4096 processes if nothing stopped it
    try:
        os.fork()
    except OSError:
        pass
print('ok', flush=True)
time.sleep(60)
"""
    result, elapsed, score = run(code, marker, processes=8, wall_s=1.5)
    assert result.timed_out and elapsed < 6
    assert score == 0.0


def test_memory_hog_stopped(marker):
    result, _, score = run("x = bytearray(1 << 30)\nprint('ok')", marker, memory_mb=128)
    assert result.limit == "memory" and "ok" not in result.stdout
    assert score == 0.0


def test_huge_output_capped(marker):
    code = "import sys\nwhile True:\n    sys.stdout.write('ok\\n' * 10000)"
    result, _, score = run(code, marker, output_bytes=1 << 16, wall_s=30.0)
    assert result.limit == "output" and len(result.stdout) == 1 << 16
    assert score == 0.0


def test_huge_file_stopped(marker):
    result, _, score = run("open('big', 'wb').write(b'x' * (64 << 20))\nprint('ok')", marker, file_mb=1)
    assert result.limit == "file_size" and "ok" not in result.stdout
    assert score == 0.0


def test_cannot_write_outside_its_directory(marker, tmp_path):
    outside = [
        tmp_path / "escaped.txt",
        Path("/tmp") / f"rlpost-escaped-{uuid.uuid4().hex}",
        Path("/dev/shm") / f"rlpost-escaped-{uuid.uuid4().hex}",
    ]
    code = f"""
import os
wrote = []
for path in {[str(p) for p in outside]!r}:
    try:
        with open(path, 'w') as f:
            f.write('x')
        wrote.append(path)
    except OSError:
        pass
open('inside.txt', 'w').write('fine')  # its own directory stays writable
print('ok' if wrote else 'refused', os.path.exists('inside.txt'))
"""
    try:
        result, _, score = run(code, marker)
        assert result.stdout == "refused True\n", result.stderr
        assert not any(p.exists() for p in outside)
        assert score == 0.0
    finally:  # were the walls down, do not leave the evidence behind
        for p in outside:
            p.unlink(missing_ok=True)


def test_cannot_read_the_parents_environment(marker):
    # /proc/<pid>/environ shows the environment a process started with, so the secret
    # goes into the environment of a parent started for this test.
    secret = uuid.uuid4().hex
    code = f"""
import os, sys
seen = str(dict(os.environ))
for pid in (int(sys.argv[2]), os.getppid()):
    try:
        seen += open(f'/proc/{{pid}}/environ').read()
    except OSError:
        pass
print('ok' if {secret!r} in seen else sorted(os.environ))
"""
    parent = f"""
import os
from rlpost.rewards.scoring.sandbox import run_python
print(run_python({code!r}, argv=[{marker!r}, str(os.getpid())]).stdout, end='')
"""
    env = {**os.environ, "RLPOST_TEST_SECRET": secret}
    out = subprocess.run([sys.executable, "-c", parent], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout == "['LANG', 'PATH']\n", out.stderr
    assert CodeTests(Limits(), task=None)(code, expect_ok(marker)) == 0.0


def test_cannot_open_a_socket_to_the_host(marker):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"""
import socket
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()
    print('ok')
except OSError as e:
    print('refused', e.errno)
"""
        result, _, score = run(code, marker)
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()
    assert result.stdout.startswith("refused"), result.stderr
    assert score == 0.0


def test_cannot_kill_its_parent(marker):
    # a test run detached from its shell has init (PID 1) as parent: inside the namespace PID 1
    # is the program itself, which kill() reaches harmlessly, so it is no target there
    ours = sorted({os.getpid(), os.getppid()} - {1})
    code = f"""
import os
killed = []
for pid in (os.getppid(), *{ours}):  # its parent, this test, our parent
    try:
        os.kill(pid, 9)
        killed.append(pid)
    except OSError:
        pass
print('ok' if set(killed) & set({ours}) else f'refused {{os.getppid()}}')
"""
    result, _, score = run(code, marker)
    assert Path(f"/proc/{os.getppid()}").exists()  # our parent is alive (and so are we)
    assert result.stdout == "refused 0\n"  # PID 1 of its own namespace: no parent to see
    assert score == 0.0
