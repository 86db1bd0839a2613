"""One RL step of the quickstart job, phase by phase, on Ray and in-process, against TRL's GRPOTrainer.

    python bench/rl_step.py                   # 20 RL steps per run, 500 warm-up steps
    python bench/rl_step.py --steps 40

rlpost: `rlpost train configs/quickstart.yaml` in `mode=ray`, then in
`mode=inprocess`, each in a child process, with only the warm-up and step
counts changed. The Ray run's short warm-up (enough for the policy to answer
in about the quickstart's response lengths) writes the model that the
in-process run and TRL start from, so all three sample the same lengths. From
each run's metrics.jsonl, per phase, the median over steps (the first
--skip steps left out) of

- the compute the workers measure: the rollout worker's `generate`, the
  learner's log-prob forward and its forward/backward/optimizer loop
  (`time/compute/*`), the reward phase and the weight sync (controller walls);
- the framework overhead: the step's wall time minus all of those, and where
  it sits (each phase's wall time minus its compute);
- the loop wall: the time between two steps' metrics rows, which adds what the
  step's phases leave out (metrics, logging) and is what the TRL run is timed by.

TRL: `trl.GRPOTrainer` on the same model, prompts and reward (the task's
score), 32 prompts x 8 samples, at most 6 new tokens, transformers generate,
two optimizer steps of two 64-sequence micro-batches per generation batch (as
the quickstart's learner cuts them), beta 0, fp32 on the CPU, no reporting
and no saving, in a child process. A callback times each generation batch
(two optimizer steps, one rlpost RL step); the median skips the same first
batches. Ratios below 1 mean rlpost's step is the faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import set_cpu_threads, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MODES = {"ray": "Ray", "inprocess": "in-process"}

# (label, per-step value from a metrics row)
PHASES = [
    ("generate (compute)", lambda r: r["time/compute/generate"]),
    ("reward", lambda r: r["time/reward"]),
    ("log-prob forward (compute)", lambda r: r["time/compute/logprob"]),
    ("update fwd/bwd/optimizer (compute)", lambda r: r["time/compute/update"]),
    ("weight sync", lambda r: r["time/weight_sync"]),
    ("framework overhead", lambda r: r["time/framework_overhead"]),
    ("  in rollout", lambda r: r["time/rollout"] - r["time/compute/generate"]),
    # one phase when a learner call scores and trains (no time/logprob; learner.epochs 1)
    (
        "  in log-prob and update",
        lambda r: (
            r.get("time/logprob", 0.0)
            + r["time/update"]
            - r["time/compute/logprob"]
            - r["time/compute/update"]
        ),
    ),
    ("framework overhead + weight sync", lambda r: r["time/framework_overhead"] + r["time/weight_sync"]),
    ("step (time/step)", lambda r: r["time/step"]),
    ("outside the step (metrics, logging)", lambda r: r["loop"] - r["time/step"]),
    ("loop wall per step", lambda r: r["loop"]),
]


def run_rlpost(out_dir: Path, overrides: list[str]) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "rlpost.cli",
        "train",
        str(QUICKSTART),
        f"output_dir={out_dir}",
        "eval_every=0",
        "save_every=0",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    (run_dir,) = [p for p in out_dir.iterdir() if p.is_dir()]
    return run_dir


def step_rows(run_dir: Path, skip: int) -> list[dict]:
    """Metrics rows of the RL steps after the first `skip`, each with its loop wall."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for prev, row in zip(rows, rows[1:]):
        row["loop"] = row["time"] - prev["time"]
    return [r for r in rows if r["step"] > skip]


def summarise(rows: list[dict]) -> dict:
    """Per phase: median seconds and median share of time/step."""
    return {
        label: (
            statistics.median(value(r) for r in rows),
            statistics.median(value(r) / r["time/step"] for r in rows),
        )
        for label, value in PHASES
    }


def trl_child(args) -> None:
    """Train with TRL's GRPOTrainer from --model-dir and write the batch timings to --result."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlpost.jobs.preflight import load_config
    from rlpost.model.load import BOS
    from rlpost.rewards import build_task

    cfg = load_config(QUICKSTART)
    rc, lc = cfg.rollout, cfg.learner
    task = build_task(cfg.task.name, cfg.task.args)
    problems = {BOS + p.prompt: p for p in task.problems(cfg.task.train_size, seed=cfg.seed)}
    lengths: list[int] = []

    def task_score(prompts, completions, completion_ids, **_):
        lengths.extend(map(len, completion_ids))
        return [task.score(c, problems[p]) for p, c in zip(prompts, completions)]

    class BatchTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, *_, **__):
            self.marks.append(time.perf_counter())

        def on_step_end(self, _args, state, *_, **__):
            if state.global_step % optimizer_steps == 0:
                self.marks.append(time.perf_counter())

    sequences = rc.prompts_per_step * rc.n
    micro = lc.micro_batch_size
    optimizer_steps = sequences // lc.mini_batch_size
    accumulation = lc.mini_batch_size // micro
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accumulation,
            steps_per_generation=optimizer_steps * accumulation,
            num_generations=rc.n,
            max_completion_length=rc.max_new_tokens,
            temperature=rc.temperature,
            top_p=rc.top_p,
            beta=0.0,
            loss_type="dapo",
            epsilon=cfg.algorithm.params()["clip_eps_low"],
            learning_rate=lc.lr,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=lc.lr_warmup_steps,
            weight_decay=lc.weight_decay,
            max_grad_norm=lc.grad_clip,
            optim="adamw_torch",
            max_steps=args.steps * optimizer_steps,
            logging_steps=optimizer_steps,
            use_cpu=True,
            bf16=False,
            fp16=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=cfg.seed,
        )
        timer = BatchTimer()
        trainer = GRPOTrainer(
            model=args.model_dir,
            reward_funcs=task_score,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": list(problems)}),
            callbacks=[timer],
        )
        trainer.train()
    # one generation batch per timed step, or the timings would not be RL steps
    assert len(lengths) == args.steps * sequences, (len(lengths), args.steps * sequences)
    seconds = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    Path(args.result).write_text(
        json.dumps(
            {
                "seconds": seconds[args.skip :],
                "length": statistics.mean(lengths[args.skip * sequences :]),
            }
        )
    )


def run_trl(args, model_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "trl.json"
        cmd = [
            sys.executable,
            __file__,
            *sys.argv[1:],
            "--model-dir",
            str(model_dir),
            "--result",
            str(result),
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the TRL run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="RL steps (TRL: generation batches) per run")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument(
        "--warmup-steps",
        type=int,
        default=500,
        help="supervised warm-up of the quickstart (2500 there); sets the response lengths",
    )
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)  # set for the TRL child process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.result:
        set_cpu_threads()
        trl_child(args)
        return

    summaries, loops, lengths = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"steps={args.steps}"]
        ray_run = run_rlpost(Path(tmp) / "ray", [*common, "mode=ray", f"warmup.steps={args.warmup_steps}"])
        model_dir = ray_run / "models" / "warmup"
        runs = {
            "ray": ray_run,
            "inprocess": run_rlpost(
                Path(tmp) / "inprocess",
                [*common, "mode=inprocess", "warmup.steps=0", "model.kind=hf", f"model.path={model_dir}"],
            ),
        }
        for mode, run_dir in runs.items():
            rows = step_rows(run_dir, args.skip)
            summaries[mode] = summarise(rows)
            loops[mode] = statistics.median(r["loop"] for r in rows)
            lengths[mode] = statistics.mean(r["response_length/mean"] for r in rows)
            print(f"  rlpost {MODES[mode]}: {loops[mode]:.3f} s per step", flush=True)
        trl = run_trl(args, model_dir)
    trl_step = statistics.median(trl["seconds"])
    print(f"  TRL: {trl_step:.3f} s per step", flush=True)

    print(
        f"\nquickstart RL step (32 prompts x 8 samples, <= 6 new tokens, 2 optimizer steps), "
        f"{args.warmup_steps} warm-up steps, median of steps {args.skip + 1}-{args.steps}; "
        f"% of time/step\n"
    )
    rows = []
    for label, _ in PHASES:
        row = {"phase": label}
        for mode, name in MODES.items():
            seconds, share = summaries[mode][label]
            row[f"{name} s"], row[f"{name} %"] = f"{seconds:.4f}", f"{share:.1%}"
        rows.append(row)
    print(table(rows, ["phase", *(f"{n} {u}" for n in MODES.values() for u in ("s", "%"))]))

    print(
        "\nframework overhead target: < 10% of the step; "
        + "; ".join(f"{MODES[m]} {summaries[m]['framework overhead'][1]:.1%}" for m in MODES)
        + " (with weight sync: "
        + "; ".join(f"{MODES[m]} {summaries[m]['framework overhead + weight sync'][1]:.1%}" for m in MODES)
        + ")"
    )

    rows = [
        {
            "run": f"rlpost {name}",
            "step s": f"{loops[mode]:.3f}",
            "response tokens": f"{lengths[mode]:.2f}",
            "step vs TRL": f"{loops[mode] / trl_step:.2f}x",
        }
        for mode, name in MODES.items()
    ]
    rows.append(
        {
            "run": "TRL GRPOTrainer",
            "step s": f"{trl_step:.3f}",
            "response tokens": f"{trl['length']:.2f}",
            "step vs TRL": "1.00x",
        }
    )
    print("\nwhole step (rlpost: loop wall; TRL: one generation batch), mean response tokens per sample\n")
    print(table(rows, ["run", "step s", "response tokens", "step vs TRL"]))


if __name__ == "__main__":
    main()
