"""Experiment tracking: console lines, `metrics.jsonl`, Weights & Biases, a PNG of curves.

`metrics.jsonl` is the source of truth: one JSON object per `Tracker.log` call,
`{"step", "time", **metrics}`, flushed line by line. The plot is always redrawn
from it, and on resume it is cut back to the checkpoint's step first, so a run
that was killed after its last checkpoint leaves no stale steps behind.

W&B is optional (`cfg.tracking.wandb`: online | offline | disabled) and is only
imported when enabled. Its run id lives in `run_dir/wandb_id.txt` so a resumed
run continues the same W&B run. A W&B run carries `tracking.group`, the name
`tracking.run_name` (else the config's `name`), `tracking.tags`, the whole
resolved config, and the metrics at their RL step (W&B's step axis).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlpost.files import write_jsonl

if TYPE_CHECKING:
    from rlpost.config.rl import TrainConfig

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
PLOT_FILE = Path("plots") / "metrics.png"

# (metric key, console label, format) in console order.
CONSOLE_METRICS: list[tuple[str, str, str]] = [
    ("reward/mean", "reward", "{:.3f}"),
    ("eval/accuracy_greedy", "acc", "{:.3f}"),
    ("eval/accuracy_sampled", "acc_sampled", "{:.3f}"),
    ("loss", "loss", "{:.4f}"),
    ("entropy", "entropy", "{:.3f}"),
    ("clip_frac_low", "clip_lo", "{:.4f}"),
    ("clip_frac_high", "clip_hi", "{:.4f}"),
    ("response_length/mean", "len", "{:.1f}"),
    ("time/step", "time", "{:.2f}s"),
    ("tokens_per_sec", "tok/s", "{:.0f}"),
]

# Plot panels: (title, y label, [(metric key, legend label)], is_eval).
PLOT_PANELS: list[tuple[str, str, list[tuple[str, str]], bool]] = [
    ("Reward", "mean reward", [("reward/mean", "reward/mean")], False),
    (
        "Eval accuracy",
        "accuracy",
        [("eval/accuracy_greedy", "greedy"), ("eval/accuracy_sampled", "sampled")],
        True,
    ),
    ("Entropy", "entropy (nats/token)", [("entropy", "entropy")], False),
    ("Response length", "tokens", [("response_length/mean", "mean length")], False),
    ("Loss", "loss", [("loss", "loss")], False),
    (
        "Clip fraction",
        "fraction of tokens",
        [("clip_frac_low", "low (adv < 0)"), ("clip_frac_high", "high (adv > 0)")],
        False,
    ),
]

_RESERVED = ("step", "time")


def _lookup(metrics: dict[str, Any], key: str) -> Any:
    """`key` itself, else the first key ending in '/<key>' (e.g. 'train/loss' for 'loss')."""
    if key in metrics:
        return metrics[key]
    suffix = "/" + key
    for k, v in metrics.items():
        if k.endswith(suffix) and (key.startswith("eval/") or not k.startswith("eval/")):
            return v
    return None


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, non-numeric, NaN or inf)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _json_value(value: Any) -> Any:
    """JSON-safe scalar: ints stay ints, non-finite floats become null (strict JSON)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
        if isinstance(value, (bool, int)):
            return value
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return x if math.isfinite(x) else None


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parse metrics.jsonl, skipping blank or broken lines (a killed run may leave half a line)."""
    rows = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


class Tracker:
    # what the console line and the plot show; a job with other metrics (rlpost sft / dpo)
    # sets its own
    console_metrics = CONSOLE_METRICS
    plot_panels = PLOT_PANELS

    def __init__(self, run_dir: Path, cfg: TrainConfig, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.metrics_path = self.run_dir / METRICS_FILE
        self.plot_path = self.run_dir / PLOT_FILE
        self._closed = False

        # Steps at or below this were already sent to W&B by the run we resume;
        # W&B drops (and warns about) steps that go backwards, so skip them.
        self._wandb_skip_through: int | None = None
        if resume_step is not None:
            self._wandb_skip_through = self._truncate(resume_step)
            self._file = open(self.metrics_path, "a", encoding="utf-8")
        else:
            self._file = open(self.metrics_path, "w", encoding="utf-8")

        self.wandb_run = None
        if cfg.tracking.wandb != "disabled":
            self.wandb_run = self._init_wandb(resume=resume_step is not None)

    # ------------------------------------------------------------------ setup
    def _truncate(self, resume_step: int) -> int | None:
        """Keep rows with step <= resume_step; return the largest step the file had."""
        rows = read_metrics(self.metrics_path)
        if not rows:
            return None
        write_jsonl(self.metrics_path, [r for r in rows if r["step"] <= resume_step])
        return int(max(r["step"] for r in rows))

    def _init_wandb(self, resume: bool):
        tc = self.cfg.tracking
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        run_id = None
        if resume and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        if run_id is None:
            run_id = _new_run_id()
        id_file.write_text(run_id + "\n")

        return wandb.init(
            mode=tc.wandb,
            project=tc.project,
            entity=tc.entity,
            group=tc.group,
            name=tc.run_name or self.cfg.name,
            tags=tc.tags or None,
            config=self.cfg.model_dump(mode="json"),
            dir=str(self.run_dir),
            id=run_id,
            resume="allow" if resume else None,
            # console="off": no wrapping of stdout/stderr (the metrics
            # themselves are logged; console capture only adds noise).
            settings=wandb.Settings(silent=True, console="off"),
        )

    # ---------------------------------------------------------------- logging
    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, "time": time.time()}
        row.update({k: _json_value(v) for k, v in metrics.items() if k not in _RESERVED})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

        if self.wandb_run is not None:
            if self._wandb_skip_through is None or step > self._wandb_skip_through:
                self.wandb_run.log({k: v for k, v in row.items() if k not in _RESERVED}, step=step)

        has_eval = any(k.startswith("eval/") for k in metrics)
        every = self.cfg.tracking.log_every
        if has_eval or step % every == 0 or step == self.cfg.steps:
            self.print_line(self.format_line(metrics, step))

    def format_line(self, metrics: dict[str, Any], step: int) -> str:
        parts = [f"step {step}/{self.cfg.steps}"]
        for key, label, fmt in self.console_metrics:
            x = _lookup(metrics, key)
            if x is None:
                continue
            num = _number(x)
            parts.append(f"{label} {fmt.format(num) if num is not None else x}")
        return " | ".join(parts)

    def print_line(self, text: str) -> None:
        print(text, file=sys.stdout, flush=True)

    # ------------------------------------------------------------------- plot
    def plot(self) -> Path | None:
        """Redraw run_dir/plots/metrics.png from metrics.jsonl. Never raises.

        Returns the path, or None when there is nothing to plot (or drawing failed).
        """
        try:
            return self._plot()
        except Exception as e:  # a plot must never take a training run down
            print(f"[tracking] plot failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return None

    def _plot(self) -> Path | None:
        if not self._file.closed:
            self._file.flush()
        rows = read_metrics(self.metrics_path)

        def series(key: str) -> tuple[list[float], list[float]]:
            by_step: dict[float, float] = {}
            for r in rows:
                y = _number(_lookup(r, key))
                if y is not None:
                    by_step[r["step"]] = y  # last value logged for a step wins
            steps = sorted(by_step)
            return steps, [by_step[s] for s in steps]

        panels = []
        for title, ylabel, keys, is_eval in self.plot_panels:
            lines = [(label, *series(key)) for key, label in keys]
            lines = [ln for ln in lines if ln[1]]
            if lines:
                panels.append((title, ylabel, lines, is_eval))
        if not panels:
            return None

        # The object-oriented API renders with Agg without touching pyplot's
        # global backend (safe in headless workers and inside notebooks).
        from matplotlib.figure import Figure

        n = len(panels)
        ncols = min(3, n)
        nrows = math.ceil(n / ncols)
        fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
        fig.suptitle(f"{self.cfg.name}: step {max(r['step'] for r in rows)}/{self.cfg.steps}")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, (title, ylabel, lines, is_eval) in zip(axes.flat, panels):
            for label, xs, ys in lines:
                marker = "o" if is_eval or len(xs) <= 30 else None
                ax.plot(xs, ys, marker=marker, markersize=4, linewidth=1.5, label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if is_eval:
                ax.set_ylim(-0.02, 1.02)
            if len(lines) > 1 or is_eval:
                ax.legend(loc="best", fontsize="small")
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)

        self.plot_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.plot_path.with_name(self.plot_path.stem + ".tmp.png")
        fig.savefig(tmp, format="png")
        os.replace(tmp, self.plot_path)  # readers never see a half-written PNG
        return self.plot_path

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._file.flush()
        self.plot()
        self._file.close()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish()
            self.wandb_run = None
            # In wandb 0.31, finish() can return before the wandb-core service
            # has written the run's transaction log (an offline run-<id>.wandb
            # may still be just its 7-byte header); teardown() waits for it.
            # Skip it if someone else in this process still has a run open.
            if wandb.run is None:
                wandb.teardown()
