"""`rlpost eval CONFIG model.path=DIR`: evaluate any Hugging Face model directory (a base
model, a run's `final_model`, a checkpoint's export) on the config's eval sets.

The config is a training config: its `data.eval_files` (or its task's held-out draw),
`eval`, `reward`, `rollout` (engine, max_new_tokens, stop strings) and `mode` apply; no
learner starts and no warm-up runs. The run directory (`<name>-eval-<time>`) holds the
resolved config, `metrics.jsonl` (one row, step 0), the table (`eval/generations.txt`) and
every completion with its score (`eval/generations.jsonl`); W&B gets the metrics as configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlpost.config.rl import TrainConfig
from rlpost.jobs.run_dir import failure_marked, prepare_run_dir
from rlpost.jobs.session import Session
from rlpost.tracking.tracker import Tracker


@dataclass
class EvalResult:
    run_dir: Path
    metrics: dict[str, float]


def run_eval(cfg: TrainConfig) -> EvalResult:
    run_dir = prepare_run_dir(cfg.model_copy(update={"name": f"{cfg.name}-eval", "resume": None}))
    session = None
    # an eval set refused before anything starts leaves no directory; a later failure, FAILED
    with failure_marked(run_dir, True, lambda: session is not None and session.started):
        session = Session(cfg, run_dir)
        tracker = Tracker(run_dir, cfg)
        try:
            model_dir = session.prepare(tracker, warmup_dir=None, training=False)
            tracker.print_line(f"evaluating {model_dir}")
            session.start_rollout(model_dir)
            metrics = session.evaluate("generations")
            tracker.log(metrics, step=0)
            return EvalResult(run_dir, metrics)
        finally:
            session.shutdown()
            tracker.close()
