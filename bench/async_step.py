"""Samples/s of the synchronous, one-step-off and streaming RL loops on the CPU, and their accuracy.

    python bench/async_step.py                          # throughput: 3 arms x 4 thread splits x 2 rounds
    python bench/async_step.py --rounds 1 --splits 1/1,2/2 --arms sync,one-step-off
    python bench/async_step.py --accuracy               # the quickstart, 3 arms x seeds 0,1,2
    python bench/async_step.py --accuracy --seeds 0 --arms sync,one-step-off

Arms (config overrides of `rlpost train`, nothing else differs):

- sync: `rollout.staleness=0` (and `rollout.async_mode=deterministic`, which it ignores),
  each batch generated and trained in its own step;
- one-step-off: `rollout.staleness=1` (`rollout.async_mode=deterministic`, the default):
  batch t+1 is sent to the rollout worker at the start of step t and generated while the
  learner trains on batch t;
- streaming: `rollout.staleness=1 rollout.async_mode=streaming`.

Throughput (the default): a generation-heavy variant of the quickstart (configs/quickstart.yaml,
`mode=ray`, one transformers rollout worker, one DeepSpeed learner): no warm-up
(`warmup.steps=0`: the untrained policy samples ~17-token responses and the longest of the
256 reaches --max-new-tokens, so each `generate` runs the full length), `eval_every=0`,
`save_every=0`, --steps RL steps. The untrained policy never answers right, so every reward
is 0 and the update's gradient is zero, but the learner does its full work (log-prob pass,
forward, backward, AdamW) on the same padded batch a learning run would; the lengths stay put
across the run. Each (arm, thread split) is one child `rlpost train` process with
RLPOST_THREADS_ROLLOUT / RLPOST_THREADS_LEARNER in its environment (Ray's local actors inherit
it). Per run, medians over steps --skip+1 .. --steps-1 (the first steps start the workers and
fill the pipeline; the last one runs the final evaluation and has no batch to overlap) of

- step s: the loop wall, time between consecutive rows of metrics.jsonl (what a run's
  speed is; `time/step`, the sum of the controller's phases, is printed beside it);
- samples/s: prompts_per_step x n / step s (the samples trained on per step);
- gen share: `time/rollout` / `time/step`, the part of the step the controller waited for
  generation (in sync: the whole generation);
- rollout busy, learner busy: `time/busy/rollout_0`, `time/busy/learner_0`, each worker's
  compute seconds over the step;
- lag: `staleness/lag_mean` (0 in sync);
- other work: the cores that processes outside the run (not the child or its descendants,
  Ray's included) used while it ran, from /proc: the machine is shared, and a worker with
  2 threads slows down many times when another process holds a core.

Each round runs every split, and within a split every arm, one after another (arms
interleaved, their order rotated each round), prints the full grid, then each arm's best
split by samples/s and its ratio against sync's best in that round. The machine is
shared: runs move by 10% and more, so read both rounds; to repeat only each arm's best
split more often: --rounds 4 --splits sync=2/2,one-step-off=1/1,streaming=1/1. Results on
the 2-core machine: docs/performance.md section 7.

Accuracy (--accuracy): the real quickstart (its warm-up, 80 RL steps, eval every 20) per arm
and seed, in mode=ray. A seed's warm-up is the same in every arm, so only the first arm of
each seed (sync) runs it; every other run of that seed starts in a fresh run directory that
holds a copy of that warm-up's model, with `resume=DIR` (no checkpoint in it: the run starts
at step 1 and skips the warm-up it finds). --check-reuse also reruns sync that way for the
first seed and prints how far its metrics are from the full run's. Threads per arm
(--accuracy-splits): by default the best splits of the throughput part on the 2-core
machine (one-step-off and streaming 1/1; sync every core, the quickstart's default), so the
wall times are each arm's best too; accuracy does not depend on the split beyond float
rounding. Prints greedy accuracy before RL (step 0) and after (step 80) per run, and mean
and spread (min-max, standard deviation) per arm. Sync and one-step-off run first, then
streaming (--arms sets the order); with --keep DIR a later run can add an arm with
--reuse-from DIR (the warm-ups and the other arms' results read from there). Per arm, the
mean and range over seeds of its final accuracy minus sync's on the same seed (the same
warm-up, so the paired difference is the comparison to read).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
ARMS = {
    "sync": ["rollout.staleness=0", "rollout.async_mode=deterministic"],
    "one-step-off": ["rollout.staleness=1", "rollout.async_mode=deterministic"],
    "streaming": ["rollout.staleness=1", "rollout.async_mode=streaming"],
}
DEFAULT = "every core"
SAMPLES_PER_STEP = 32 * 8  # the quickstart's prompts_per_step x n


# ----- child runs ----------------------------------------------------------------------------
def run_train(out_dir: Path, overrides: list[str], split: str | None, log: Path) -> tuple[Path | None, dict]:
    """`rlpost train` of the quickstart in a child process with the split's threads
    ("R/L"; None: the default, every core). Returns the run directory (None if it failed)
    and what else was seen: the wall seconds, the other work on the machine meanwhile
    (`OtherWork`), the tail of the run's output."""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    for key in ("RLPOST_THREADS", "RLPOST_THREADS_ROLLOUT", "RLPOST_THREADS_LEARNER"):
        env.pop(key, None)
    if split:
        env["RLPOST_THREADS_ROLLOUT"], env["RLPOST_THREADS_LEARNER"] = split.split("/")
    cmd = [sys.executable, "-m", "rlpost.cli", "train", str(QUICKSTART), *overrides]
    if not any(o.startswith("resume=") for o in overrides):
        cmd.append(f"output_dir={out_dir}")
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        with OtherWork(proc.pid) as other:
            proc.wait()
    seen = {
        "wall": time.perf_counter() - t,
        "other": other.result(),
        "tail": "".join(log.read_text().splitlines(keepends=True)[-15:]),
    }
    if proc.returncode:
        seen["tail"] = f"{' '.join(cmd)} exited {proc.returncode}:\n{seen['tail']}"
        return None, seen
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    if resume:
        return Path(resume), seen
    (run_dir,) = [p for p in out_dir.iterdir() if p.is_dir()]
    return run_dir, seen


class OtherWork(threading.Thread):
    """While a run lasts, the CPU that processes outside it use (the machine is shared):
    every `period` seconds, each process's CPU time from /proc, the run's being the child
    process and its descendants (Ray's raylet and actors included). `result()`: the mean
    cores the others kept busy and the command that used the most."""

    def __init__(self, root: int, period: float = 2.0):
        super().__init__(daemon=True)
        self.root, self.period, self.done = root, period, threading.Event()
        self.jiffies: dict[str, int] = {}  # CPU ticks of other processes, by command
        self.t0 = self.t1 = time.monotonic()

    def __enter__(self) -> OtherWork:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()

    @staticmethod
    def snapshot() -> dict[int, tuple[int, str, int]]:
        """pid -> (parent pid, command, CPU ticks so far)."""
        out = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:  # ended meanwhile
                continue
            name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
            out[int(stat.parent.name)] = (int(fields[1]), name, int(fields[11]) + int(fields[12]))
        return out

    def run(self) -> None:
        before, me = self.snapshot(), os.getpid()
        self.t0 = time.monotonic()
        while not self.done.wait(self.period):
            now = self.snapshot()
            self.t1 = time.monotonic()
            ours = {self.root, me}
            for _ in range(8):  # descendants, a level at a time
                ours |= {pid for pid, (ppid, _, _) in now.items() if ppid in ours}
            for pid, (_, name, ticks) in now.items():
                if pid not in ours and pid in before:
                    self.jiffies[name] = self.jiffies.get(name, 0) + ticks - before[pid][2]
            before = now

    def result(self) -> tuple[float, str]:
        seconds = max(self.t1 - self.t0, 1e-9)
        total = sum(self.jiffies.values()) / os.sysconf("SC_CLK_TCK")
        top = max(self.jiffies, key=self.jiffies.get, default=None)
        return total / seconds, top if top and self.jiffies[top] > 0 else "-"


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for prev, row in zip(rows, rows[1:]):
        row["loop"] = row["time"] - prev["time"]
    return rows


def median(rows: list[dict], value) -> float | None:
    vals = [v for v in (value(r) for r in rows) if v is not None]
    return statistics.median(vals) if vals else None


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


# ----- throughput ----------------------------------------------------------------------------
def throughput_overrides(args) -> list[str]:
    return [
        "mode=ray",
        "warmup.steps=0",
        "eval_every=0",
        "save_every=0",
        f"steps={args.steps}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        *args.set,
    ]


def measure(run_dir: Path, args) -> dict:
    rows = [r for r in metric_rows(run_dir) if args.skip < r["step"] < args.steps]
    per_step = median(rows, lambda r: r["loop"])
    return {
        "steps": len(rows),
        "loop": per_step,
        "step": median(rows, lambda r: r.get("time/step")),
        "samples/s": SAMPLES_PER_STEP / per_step,
        "gen share": median(
            rows, lambda r: r["time/rollout"] / r["time/step"] if "time/rollout" in r else None
        ),
        "update": median(rows, lambda r: r.get("time/compute/update")),
        "generate": median(rows, lambda r: r.get("time/compute/generate")),
        "rollout busy": median(rows, lambda r: r.get("time/busy/rollout_0")),
        "learner busy": median(rows, lambda r: r.get("time/busy/learner_0")),
        "lag": median(rows, lambda r: r.get("staleness/lag_mean", 0.0)),
        "length": median(rows, lambda r: r.get("response_length/mean")),
    }


def grid_row(arm: str, split: str, m: dict) -> dict:
    return {
        "arm": arm,
        "split R/L": split,
        "step s": f"{m['loop']:.3f}",
        "time/step": fmt(m["step"], ".3f"),
        "samples/s": f"{m['samples/s']:.0f}",
        "gen share": fmt(m["gen share"], ".0%"),
        "generate s": fmt(m["generate"], ".3f"),
        "update s": fmt(m["update"], ".3f"),
        "rollout busy": fmt(m["rollout busy"], ".0%"),
        "learner busy": fmt(m["learner busy"], ".0%"),
        "lag": fmt(m["lag"], ".2f"),
        "resp len": fmt(m["length"], ".1f"),
        "other work": f"{m['other'][0]:.2f}",
    }


def best_table(results: dict, arms: list[str]) -> tuple[str, dict]:
    """Each arm's best split by samples/s, with its ratio against sync's best."""
    best = {}
    for arm in arms:
        runs = {s: m for (a, s), m in results.items() if a == arm and m is not None}
        if runs:
            split = max(runs, key=lambda s: runs[s]["samples/s"])
            best[arm] = (split, runs[split])
    base = best.get("sync", (None, None))[1]
    rows = [
        {
            "arm": arm,
            "best split R/L": split,
            "step s": f"{m['loop']:.3f}",
            "samples/s": f"{m['samples/s']:.0f}",
            "vs sync": f"{m['samples/s'] / base['samples/s']:.2f}x" if base else "n/a",
            "rollout busy": fmt(m["rollout busy"], ".0%"),
            "learner busy": fmt(m["learner busy"], ".0%"),
            "lag": fmt(m["lag"], ".2f"),
        }
        for arm, (split, m) in best.items()
    ]
    return table(rows, list(rows[0])) if rows else "(no run finished)", best


def throughput(args, tmp: Path) -> None:
    overrides = throughput_overrides(args)
    print(
        f"generation-heavy quickstart: rlpost train configs/quickstart.yaml {' '.join(overrides)} "
        f"+ the arm's overrides; {SAMPLES_PER_STEP} samples per step; medians of steps "
        f"{args.skip + 1}-{args.steps - 1}; split = rollout/learner torch threads\n",
        flush=True,
    )
    summary: dict[str, list] = {arm: [] for arm in args.arms}
    others: list[float] = []  # per round: the most cores other work took during one of its runs
    failures: dict[str, str] = {}
    for rnd in range(1, args.rounds + 1):
        results: dict[tuple[str, str], dict | None] = {}
        shift = (rnd - 1) % len(args.arms)
        order = args.arms[shift:] + args.arms[:shift]
        for entry in args.splits:
            only, _, split = entry.rpartition("=")  # "ARM=R/L": that arm only
            for arm in order:
                if arm in failures or (only and only != arm):
                    continue
                out = tmp / f"r{rnd}-{arm}-{split.replace('/', '_')}"
                run_dir, seen = run_train(out, [*overrides, *ARMS[arm]], split, tmp / f"{out.name}.log")
                if run_dir is None:
                    failures[arm] = seen["tail"]
                    print(f"  round {rnd} {arm} {split}: FAILED (left out from here on)", flush=True)
                    continue
                m = results[(arm, split)] = measure(run_dir, args)
                m["other"] = seen["other"]
                print(
                    f"  round {rnd} {arm:12s} {split}: {m['loop']:.3f} s per step, "
                    f"{m['samples/s']:.0f} samples/s ({seen['wall']:.0f} s run; other work "
                    f"meanwhile: {seen['other'][0]:.2f} cores, mostly {seen['other'][1]})",
                    flush=True,
                )
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
        print(f"\nround {rnd}: every run\n")
        rows = [grid_row(a, s, m) for (a, s), m in results.items() if m is not None]
        print(table(rows, list(rows[0])) if rows else "(no run finished)")
        text, best = best_table(results, args.arms)
        print(f"\nround {rnd}: each arm at its best split\n\n{text}\n", flush=True)
        for arm, (split, m) in best.items():
            summary[arm].append((split, m))
        others.append(max((m["other"][0] for m in results.values() if m is not None), default=0.0))
    if args.rounds > 1:
        rows = []
        for arm, per_round in summary.items():
            if not per_round:
                continue
            row = {"arm": arm}
            for rnd, (split, m) in enumerate(per_round, 1):
                base = summary["sync"][rnd - 1][1] if len(summary.get("sync", [])) >= rnd else None
                row[f"round {rnd}"] = f"{split}: {m['samples/s']:.0f}/s" + (
                    f" ({m['samples/s'] / base['samples/s']:.2f}x)" if base else ""
                )
            rows.append(row)
        rows.append(
            {
                "arm": "(other work, most in a run)",
                **{f"round {i}": f"{o:.2f} cores" for i, o in enumerate(others, 1)},
            }
        )
        print("every round: best split, samples/s (ratio vs sync of the same round)\n")
        print(table(rows, list(rows[0])))
    for arm, tail in failures.items():
        print(f"\n{arm} failed:\n{tail}")


# ----- accuracy ------------------------------------------------------------------------------
def copy_warmup(source: Path, dest_root: Path) -> Path:
    """A new run directory holding `source`'s config and warm-up model, nothing else."""
    dest = dest_root / source.name
    (dest / "models").mkdir(parents=True)
    shutil.copytree(source / "models" / "warmup", dest / "models" / "warmup")
    shutil.copy(source / "config.yaml", dest / "config.yaml")
    return dest


def accuracy_of(run_dir: Path) -> dict:
    rows = metric_rows(run_dir)
    evals = {r["step"]: r["eval/accuracy_greedy"] for r in rows if "eval/accuracy_greedy" in r}
    steps = [r for r in rows if r["step"] > 0]
    last = max(evals)
    return {
        "before": evals.get(0),
        "after": evals[last],
        "last": last,
        "curve": " ".join(f"{evals[k]:.3f}" for k in sorted(evals) if k > 0),
        "rl s": steps[-1]["time"] - rows[0]["time"] if steps else None,
        "rows": rows,
    }


def accuracy(args, tmp: Path) -> None:
    common = ["mode=ray", *args.set]
    results: dict[tuple[str, int], dict] = {}
    failures: dict[str, str] = {}
    warmups: dict[int, Path] = {}
    if args.reuse_from:  # an earlier --accuracy --keep DIR: its warm-ups, and its other arms' runs
        for seed in args.seeds:
            for arm in ARMS:  # sync's first: its run ran the warm-up
                found = sorted(Path(args.reuse_from).glob(f"acc-{arm}-{seed}/*/metrics.jsonl"))
                if not found:
                    continue
                warmups.setdefault(seed, found[0].parent)
                if arm not in args.arms:
                    r = results[(arm, seed)] = accuracy_of(found[0].parent)
                    r["wall"], r["reused"] = None, "earlier"
    print(
        f"quickstart: rlpost train configs/quickstart.yaml {' '.join(common)} seed=S + the arm's "
        f"overrides; threads R/L: {', '.join(f'{a} {args.splits_of.get(a, DEFAULT)}' for a in args.arms)}\n",
        flush=True,
    )
    # arms in the given order (sync and one-step-off first), each over the seeds
    for arm in args.arms:
        for seed in args.seeds:
            if arm in failures:
                continue
            out = tmp / f"acc-{arm}-{seed}"
            overrides = [*common, f"seed={seed}", *ARMS[arm]]
            reused = seed in warmups
            if reused:
                overrides = [f"resume={copy_warmup(warmups[seed], out)}", *overrides]
            split = args.splits_of.get(arm)
            run_dir, seen = run_train(out, overrides, split, tmp / f"{out.name}.log")
            if run_dir is None:
                failures[arm] = seen["tail"]
                print(f"  {arm} seed {seed}: FAILED (the arm is left out from here on)", flush=True)
                continue
            if not reused:
                warmups[seed] = run_dir
            r = results[(arm, seed)] = accuracy_of(run_dir)
            r["wall"], r["reused"] = seen["wall"], reused
            print(
                f"  {arm:12s} seed {seed}: greedy acc {fmt(r['before'], '.3f')} -> {r['after']:.3f} "
                f"(step {r['last']}); {seen['wall']:.0f} s{' (warm-up reused)' if reused else ''}; "
                f"other work meanwhile {seen['other'][0]:.2f} cores, mostly {seen['other'][1]}",
                flush=True,
            )
    if args.check_reuse and ("sync", args.seeds[0]) in results:
        seed = args.seeds[0]
        out = tmp / f"acc-check-{seed}"
        overrides = [f"resume={copy_warmup(warmups[seed], out)}", *common, f"seed={seed}", *ARMS["sync"]]
        run_dir, seen = run_train(out, overrides, args.splits_of.get("sync"), tmp / f"{out.name}.log")
        if run_dir is None:
            print(f"\nreuse check failed:\n{seen['tail']}")
        else:
            full = {r["step"]: r for r in results[("sync", seed)]["rows"]}
            again = {r["step"]: r for r in accuracy_of(run_dir)["rows"]}
            keys = ("reward/mean", "loss", "eval/accuracy_greedy", "eval/accuracy_sampled")
            diff = max(
                (abs(full[s][k] - again[s][k]) for s in full if s in again for k in keys if k in full[s]),
                default=float("nan"),
            )
            print(
                f"\nreuse check, seed {seed}, sync: the run from the copied warm-up against the full "
                f"run, steps 0-{max(again)}: max |diff| of {', '.join(keys)} = {diff:.3g}"
            )
    rows = []
    for (arm, seed), r in sorted(results.items(), key=lambda kv: (list(ARMS).index(kv[0][0]), kv[0][1])):
        rows.append(
            {
                "arm": arm,
                "seed": str(seed),
                "greedy acc before RL": fmt(r["before"], ".3f"),
                "after RL": f"{r['after']:.3f}",
                "gain": f"{(r['after'] - (r['before'] or 0)) * 100:+.1f}",
                "greedy at each eval": r["curve"],
                "RL wall s": fmt(r["rl s"], ".0f"),
                "warm-up": {True: "reused", False: "run"}.get(r["reused"], r["reused"]),
            }
        )
    print(
        "\nper run (greedy at each eval: steps eval_every, 2 x eval_every, ...; RL wall s: from the "
        "step-0 evaluation to the last metrics row)\n"
    )
    print(table(rows, list(rows[0])) if rows else "(no run finished)")
    rows = []
    for arm in ARMS:
        runs = [r for (a, _), r in results.items() if a == arm]
        if not runs:
            continue
        after = [r["after"] for r in runs]
        paired = [
            r["after"] - results[("sync", seed)]["after"]
            for (a, seed), r in results.items()
            if a == arm and ("sync", seed) in results
        ]
        before = [r["before"] for r in runs if r["before"] is not None]
        rl = [r["rl s"] for r in runs if r["rl s"] is not None]
        rows.append(
            {
                "arm": arm,
                "seeds": str(len(runs)),
                "before RL mean": f"{statistics.mean(before):.3f}" if before else "n/a",
                "after RL mean": f"{statistics.mean(after):.3f}",
                "after min-max": f"{min(after):.3f}-{max(after):.3f}",
                "after std": f"{statistics.stdev(after):.3f}" if len(after) > 1 else "n/a",
                "RL wall s mean": f"{statistics.mean(rl):.0f}" if rl else "n/a",
                "after - sync, same seed (mean; min..max)": (
                    f"{statistics.mean(paired) * 100:+.1f} pts; "
                    f"{min(paired) * 100:+.1f}..{max(paired) * 100:+.1f}"
                    if paired and arm != "sync"
                    else "-"
                ),
            }
        )
    print("\nper arm\n")
    print(table(rows, list(rows[0])) if rows else "(no run finished)")
    for arm, tail in failures.items():
        print(f"\n{arm} failed:\n{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accuracy", action="store_true", help="the accuracy part instead of throughput")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--rounds", type=int, default=2, help="throughput: rounds of the whole grid")
    ap.add_argument(
        "--splits",
        default="2/2,1/1,1/2,2/1",
        help="throughput: rollout/learner torch threads to try; ARM=R/L: for that arm only",
    )
    ap.add_argument("--steps", type=int, default=16, help="throughput: RL steps per run")
    ap.add_argument("--skip", type=int, default=3, help="throughput: first steps left out of the medians")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="throughput: rollout.max_new_tokens")
    ap.add_argument("--seeds", default="0,1,2", help="accuracy: seeds")
    ap.add_argument(
        "--accuracy-splits",
        default="one-step-off=1/1,streaming=1/1",
        help="accuracy: rollout/learner threads per arm (the best of the throughput part on the "
        "2-core machine); an arm not named uses every core for both",
    )
    ap.add_argument(
        "--check-reuse",
        action="store_true",
        help="accuracy: rerun the first seed's sync from the copied warm-up",
    )
    ap.add_argument(
        "--reuse-from",
        help="accuracy: the --keep folder of an earlier accuracy run: its warm-ups are reused and its "
        "runs of the arms not in --arms shown beside the new ones",
    )
    ap.add_argument("--set", action="append", default=[], help="extra override for every run (repeatable)")
    ap.add_argument("--keep", help="keep the run directories and logs here instead of a temporary folder")
    args = ap.parse_args()
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        sys.exit(f"unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}")
    args.splits = args.splits.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.splits_of = dict(kv.split("=") for kv in args.accuracy_splits.split(",") if kv)
    if args.keep:
        tmp = Path(args.keep)
        tmp.mkdir(parents=True, exist_ok=True)
        (accuracy if args.accuracy else throughput)(args, tmp)
    else:
        with tempfile.TemporaryDirectory() as d:
            (accuracy if args.accuracy else throughput)(args, Path(d))


if __name__ == "__main__":
    main()
