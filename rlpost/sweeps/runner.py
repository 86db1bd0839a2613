"""Running a sweep: one `rlpost train` process per run, one after another.

    <output_dir>/<name>/
      sweep.yaml    the sweep file as it was last run
      sweep.json    its expansion: arms, seeds, runs (what `rlpost report` reads)
      runs/<id>/    the run's output_dir: the trainer's run directory <name>-<time>/,
                    train.log (the run's console) and done.json once it finished
      report/       report.md and the plots (rlpost.sweeps.report)

Each run is its own process (`python -m rlpost.cli train`), so a crash, Ray or
DeepSpeed state, or memory a run leaves behind stays with that run. Running the
same sweep again skips the runs with a done.json and resumes a run that started
but did not finish from its last checkpoint. A run whose config changed since it
started (an edited base or sweep file) stops the sweep before anything runs:
finished and new results would not be comparable.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import yaml

from rlpost.config.rl import TrainConfig
from rlpost.errors import ConfigError
from rlpost.sweeps.manifest import DONE, finished, run_output_dir, started_run_dir, write_manifest
from rlpost.sweeps.report import write_report
from rlpost.sweeps.sweep import Run, Sweep
from rlpost.tracking.tracker import METRICS_FILE, read_metrics

LOG = "train.log"
# Keys a resumed run may change: where it continues, and which cluster runs it.
RESUMABLE_CHANGES = ("resume", "ray.address")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(run_dir: Path, cfg: TrainConfig) -> list[str]:
    """Keys whose value in `cfg` differs from the config the run started with."""
    before = _flat(yaml.safe_load((run_dir / "config.yaml").read_text()))
    now = _flat(cfg.model_dump(mode="json"))
    # a key rlpost gained since the run started, at its default, is no change
    defaults = _flat(type(cfg)().model_dump(mode="json"))
    return [
        k
        for k in sorted(set(before) | set(now))
        if k not in RESUMABLE_CHANGES
        and before.get(k) != now.get(k)
        and not (k not in before and k in defaults and now.get(k) == defaults[k])
    ]


def plan(sweep: Sweep) -> list[tuple[Run, Path | None]]:
    """Every run with, if it started before, its run directory. Resolves (validates)
    every run's config; raises ConfigError when a started run's config changed."""
    out = []
    for run in sweep.runs:
        cfg = sweep.resolve(run)
        run_dir = started_run_dir(sweep.directory, run.id)
        if run_dir is not None:
            changed = config_changes(run_dir, cfg)
            if changed:
                raise ConfigError(
                    f"{sweep.path}: run {run.id} started with a different config "
                    f"({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} changed); "
                    f"remove {run_output_dir(sweep.directory, run.id)} or give the sweep "
                    f"another name (--name)"
                )
        out.append((run, run_dir))
    return out


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# The trainer's progress lines (rlpost.tracking / rlpost.jobs.rl): "warm-up 250/2500 | ..."
# and "step 20/80 | ...".
PROGRESS_LINE = re.compile(r"^(warm-up|step) (\d+)/(\d+)\b")


class Progress:
    """The sweep's console: which run is going, its step, and the time left.

    The time left is the current run's remaining RL steps at its measured rate
    (before that: the mean duration of the finished runs minus the time spent)
    plus, per run still to come, the mean duration of finished runs (before any
    finished: the current run's own estimate)."""

    def __init__(
        self,
        total: int,
        out: TextIO = sys.stdout,
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.out, self.every, self.clock = total, out, every, clock
        self.durations: list[float] = []  # seconds of the runs that finished

    def say(self, index: int, run: Run, text: str) -> None:
        print(
            f"[sweep {index}/{self.total}] arm={run.arm} seed={run.seed} | {text}", file=self.out, flush=True
        )

    def begin(self, index: int, run: Run, after: int) -> None:
        """Run `index` (1-based) starts; `after` runs are still to come after it."""
        self.index, self.run, self.after = index, run, after
        self.t0 = self.clock()
        self.first_step: tuple[float, int] | None = None  # (time, step) of the first RL line
        self.last_step: tuple[float, int, int] | None = None  # (time, step, steps)
        self.last_print = float("-inf")

    def feed(self, line: str) -> None:
        m = PROGRESS_LINE.match(line)
        if not m:
            return
        phase, done, total = m.group(1), int(m.group(2)), int(m.group(3))
        now = self.clock()
        if phase == "step":
            self.first_step = self.first_step or (now, done)
            self.last_step = (now, done, total)
        if now - self.last_print >= self.every or done == total:
            self.last_print = now
            self.say(self.index, self.run, f"{phase} {done}/{total} | eta {format_seconds(self.eta())}")

    def current_left(self) -> float | None:
        now = self.clock()
        if self.first_step and self.last_step and self.last_step[1] > self.first_step[1]:
            (t0, s0), (t1, s1, total) = self.first_step, self.last_step
            return max((total - s1) * (t1 - t0) / (s1 - s0) - (now - t1), 0.0)
        if self.durations:
            return max(statistics.mean(self.durations) - (now - self.t0), 0.0)
        return None

    def eta(self) -> float | None:
        left = self.current_left()
        if left is None:
            return None
        per_run = statistics.mean(self.durations) if self.durations else self.clock() - self.t0 + left
        return left + self.after * per_run

    def end(self, seconds: float) -> float:
        """The current run took `seconds`; returns the estimated time left after it."""
        self.durations.append(seconds)
        return self.after * statistics.mean(self.durations)


def _accuracy_line(run_dir: Path) -> str:
    acc = [
        r["eval/accuracy_greedy"]
        for r in read_metrics(run_dir / METRICS_FILE)
        if isinstance(r.get("eval/accuracy_greedy"), (int, float))
    ]
    return f" | greedy acc {acc[0]:.3f} -> {acc[-1]:.3f}" if acc else ""


def execute(cmd: list[str], log_path: Path, on_line: Callable[[str], None]) -> int:
    """Run `cmd`, its stdout and stderr appended to log_path and each line passed on."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (
        open(log_path, "a", encoding="utf-8") as log,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace"
        ) as proc,
    ):
        for line in proc.stdout:
            log.write(line)
            log.flush()
            on_line(line.rstrip("\n"))
    return proc.returncode


def run_sweep(
    sweep: Sweep, out: TextIO = sys.stdout, report: bool = True, progress_every: float = 10.0
) -> int:
    """Run every unfinished run of the sweep; returns how many failed."""
    runs = plan(sweep)  # every config validated (and unchanged) before anything runs
    write_manifest(sweep)
    d = sweep.directory
    pending = [i for i, (run, _) in enumerate(runs, start=1) if finished(d, run.id) is None]
    print(
        f"sweep {sweep.name}: {len(runs)} runs ({len(sweep.arms)} arms x "
        f"{len(sweep.seeds)} seeds), {len(runs) - len(pending)} finished before -> {d}",
        file=out,
        flush=True,
    )
    progress = Progress(len(runs), out, every=progress_every)
    failed = []
    for index, (run, run_dir) in enumerate(runs, start=1):
        if index not in pending:
            progress.durations.append(finished(d, run.id)["seconds"])
            progress.say(index, run, "finished before, skipped")
            continue
        out_dir = run_output_dir(d, run.id)
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "rlpost.cli", "train", str(sweep.base), *sweep.overrides(run)]
        if run_dir is not None:
            cmd.append(f"resume={run_dir}")
        progress.begin(index, run, after=sum(i > index for i in pending))
        progress.say(index, run, f"resuming {run_dir}" if run_dir else "starting")
        t0 = time.monotonic()
        code = execute(cmd, out_dir / LOG, progress.feed)
        seconds = time.monotonic() - t0
        run_dir = started_run_dir(d, run.id)
        if code != 0 or run_dir is None:
            failed.append(run.id)
            tail = (out_dir / LOG).read_text(errors="replace").splitlines()[-15:]
            progress.say(
                index,
                run,
                f"FAILED (exit {code}) after {format_seconds(seconds)}; the end of {out_dir / LOG}:",
            )
            print("\n".join("    " + line for line in tail), file=out, flush=True)
            continue
        (out_dir / DONE).write_text(
            json.dumps(
                {
                    "run_dir": str(run_dir.relative_to(d)),
                    "seconds": round(seconds, 1),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
            + "\n"
        )
        left = progress.end(seconds)
        progress.say(
            index,
            run,
            f"finished in {format_seconds(seconds)}{_accuracy_line(run_dir)} | eta {format_seconds(left)}",
        )
    print(
        f"sweep {sweep.name}: {len(runs) - len(failed)} of {len(runs)} runs finished"
        + (f"; failed: {', '.join(failed)} (run the sweep again to resume them)" if failed else ""),
        file=out,
        flush=True,
    )
    if report and len(failed) < len(runs):
        print(f"report: {write_report(d)}", file=out, flush=True)
    return len(failed)
