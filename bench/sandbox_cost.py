"""Cost per program of the code sandbox's walls, against today's launcher in the same run.

    python bench/sandbox_cost.py                    # 5 rounds x 20 programs per setup
    python bench/sandbox_cost.py --rounds 9 --programs 30

Each setup runs the same tiny program (`print('ok')`) through `run_python` one after
another; the rounds interleave the setups, so that the machine's noise falls on all of
them alike. Printed per setup: the median over rounds of the mean wall ms per program, the
spread of the round means (min-max), the CPU ms per program (this process and all its
children), and the ratios to "today" (the launcher without the
cgroup, mount, IPC and seccomp walls: rlimits, PID and network namespaces, Landlock, own
uid). For reference, also a bare `python -I -S -B` start and, when `bwrap` is on the PATH,
bubblewrap's own cost (namespaces, read-only root, a size-limited tmpfs; without our
cgroup, rlimits, Landlock or seccomp, which it does not do; its CPU time is not
measurable from here).

On cgroup v1, moving a process into a cgroup waits for an RCU grace period (~10 ms here,
no CPU); run_python moves the launcher while it starts up, so the wait overlaps its
start-up rather than adding to it.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import tempfile
import time

from rlpost.rewards.scoring import sandbox
from rlpost.rewards.scoring.sandbox import ENV, Limits, program_interpreter, run_python

PROGRAM = "print('ok')"


def sandboxed(off: frozenset[str]):
    def run() -> None:
        sandbox._WALLS_OFF = off
        try:
            result = run_python(PROGRAM, limits=Limits())
        finally:
            sandbox._WALLS_OFF = frozenset()
        assert result.stdout == "ok\n", result

    return run


def bare() -> None:
    out = subprocess.run(
        [program_interpreter(), "-I", "-S", "-B", "-c", PROGRAM], capture_output=True, env=ENV
    )
    assert out.stdout == b"ok\n"


def bubblewrap(bwrap: str):
    tmp = tempfile.gettempdir()

    def run() -> None:
        with tempfile.TemporaryFile() as code:
            code.write(PROGRAM.encode())
            code.seek(0)
            fd = code.fileno()
            command = [
                bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
                "--size", str(64 << 20), "--tmpfs", tmp, "--file", str(fd), f"{tmp}/main.py",
                "--chdir", tmp, "--clearenv",
                "--setenv", "PATH", ENV["PATH"], "--setenv", "LANG", ENV["LANG"],
                program_interpreter(), "-I", "-S", "-B", "main.py",
            ]  # fmt: skip
            out = subprocess.run(command, capture_output=True, pass_fds=(fd,), stdin=subprocess.DEVNULL)
        assert out.stdout == b"ok\n", out

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--programs", type=int, default=20)
    args = parser.parse_args()
    every = sandbox.WALLS
    setups = {
        "today (no cgroup/mount/ipc/seccomp)": sandboxed(every),
        "today + cgroup": sandboxed(every - {"cgroup"}),
        "today + mount (ro + tmpfs)": sandboxed(every - {"mount"}),
        "today + ipc namespace": sandboxed(every - {"ipc"}),
        "today + seccomp": sandboxed(every - {"seccomp"}),
        "all walls (the sandbox now)": sandboxed(frozenset()),
        "bare python -I -S -B (reference)": bare,
    }
    bwrap = shutil.which("bwrap")
    if bwrap:
        setups["bwrap 0.8: ns + ro / + tmpfs (reference)"] = bubblewrap(bwrap)
    for run in setups.values():  # warm up: imports, page cache, the cgroup sweep
        run()
    means: dict[str, list[float]] = {name: [] for name in setups}
    cpu: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, run in setups.items():
            start, start_cpu = time.perf_counter(), cpu_s()
            for _ in range(args.programs):
                run()
            means[name].append((time.perf_counter() - start) / args.programs * 1000)
            cpu[name].append((cpu_s() - start_cpu) / args.programs * 1000)
    base = statistics.median(means[next(iter(setups))])
    base_cpu = statistics.median(cpu[next(iter(setups))])
    print(
        f"{args.rounds} rounds x {args.programs} programs; wall ms per program: median of round means "
        "[min-max], ratio to today; CPU ms per program (all processes), ratio to today"
    )
    for name, values in means.items():
        median, median_cpu = statistics.median(values), statistics.median(cpu[name])
        spread = f"[{min(values):6.1f}-{max(values):6.1f}]"
        # bwrap's pid-namespace init does not reap the program, so its CPU time is not ours to see
        cpu_text = "n/a" if name.startswith("bwrap") else f"{median_cpu:5.1f} ms x{median_cpu / base_cpu:.2f}"
        print(f"{name:42s} {median:6.1f} ms {spread} x{median / base:.2f}   CPU {cpu_text}")


def cpu_s() -> float:
    """CPU seconds of this process and its reaped children (launchers, programs, bwrap)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
