"""A job's run directory and the controller's part of its checkpoints.

    RUN_DIR/config.yaml                          the config with every default written out
    RUN_DIR/checkpoints/<tag>/                   the learners' checkpoint (they write it)
    RUN_DIR/checkpoints/<tag>/trainer_state.json the controller's: step, RNG states, and
                                                 the job's own (its stream position, ...)
    RUN_DIR/final_model/                         the trained policy, a HF directory
    RUN_DIR/FAILED                               why the run stopped, one line (only then)

trainer_state.json is written after the learners' part and atomically, so a checkpoint
counts as complete exactly when it has one; resume restores the controller's RNG
states, so the draws after a resume are those an uninterrupted run would have made.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from rlpost.config.load import dump_config
from rlpost.data.rows import PreferenceDataError, one_line
from rlpost.errors import ConfigError
from rlpost.files import write_json
from rlpost.tracking.tracker import METRICS_FILE, read_metrics
from rlpost.workers.learner import checkpoint_tags

STATE_FILE = "trainer_state.json"
FAILED_FILE = "FAILED"


def prepare_run_dir(cfg) -> Path:
    """`cfg.resume`, or a new directory output_dir/name-timestamp[-n]; the config written
    into it either way (a resumed run records what it resumed with)."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{suffix}"
        run_dir.mkdir(parents=True)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # a resumed run is no longer the failed one
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


@contextmanager
def failure_marked(run_dir: Path, new: bool, started: Callable[[], bool]) -> Iterator[None]:
    """The job run inside: an input refused (`ConfigError`, `PreferenceDataError`) before
    it `started` any worker removes the run directory it had just made (`new`), so a refused
    run leaves nothing; any other failure writes RUN_DIR/FAILED, its one-line reason."""
    try:
        yield
    except (ConfigError, PreferenceDataError) as e:
        if new and not started():
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            mark_failed(run_dir, e)
        raise
    except BaseException as e:
        mark_failed(run_dir, e)
        raise


def failure_line(error: BaseException) -> str:
    """One line saying why a run stopped: the error's type and the first line of its message."""
    if isinstance(error, KeyboardInterrupt):
        return "KeyboardInterrupt: interrupted"
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return line if len(line) <= 1000 else line[:997] + "..."


def mark_failed(run_dir: Path, error: BaseException) -> None:
    """RUN_DIR/FAILED: the reason the run stopped, one line (a later resume removes it)."""
    if not run_dir.is_dir():
        return
    tmp = run_dir / (FAILED_FILE + ".tmp")
    try:
        tmp.write_text(failure_line(error) + "\n")
        os.replace(tmp, run_dir / FAILED_FILE)
    except OSError:  # a full disk, often the very reason: the error itself must still surface
        tmp.unlink(missing_ok=True)


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written (a full disk, ...): it is removed, the
    earlier ones are untouched."""


def save_checkpoint(
    run_dir: Path,
    learners,
    step: int,
    state: dict,
    write_files: Callable[[Path], None] | None = None,
    retention: Retention | None = None,
) -> None:
    """Checkpoint `step_<step>`: the learners' part, the job's own files (`write_files` of
    the checkpoint's directory), every file flushed to disk (fsync), then the controller's
    (`state`, the step and the RNG states), which makes it complete; only then are the
    checkpoints `retention` does not keep deleted. A write that fails (no space left, ...)
    removes the new checkpoint's directory and raises CheckpointError, the others kept."""
    tag_dir = run_dir / "checkpoints" / f"step_{step}"
    try:
        learners.call("save_checkpoint", str(tag_dir.parent), tag_dir.name)
        if write_files is not None:
            write_files(tag_dir)
        sync_tree(tag_dir)
        state = {
            "step": step,
            **state,
            "python_rng": random.getstate(),
            "torch_rng": torch.get_rng_state().tolist(),
        }
        # written whole or not at all: a run killed mid-write must still find its last checkpoint
        write_json(tag_dir / STATE_FILE, state, durable=True)
        sync_tree(tag_dir / STATE_FILE)
    except Exception as e:
        shutil.rmtree(tag_dir, ignore_errors=True)
        last = latest_checkpoint(run_dir)
        kept = f"the last complete one, {last[0]}, is intact" if last else "there is no earlier one"
        cause = getattr(e, "cause", None) or e  # a Ray task's error holds the worker's
        raise CheckpointError(
            f"checkpoint {tag_dir.name} could not be written ({type(cause).__name__}: "
            f"{one_line(cause)}); it was removed and {kept}"
        ) from e
    if retention is not None:
        prune_checkpoints(run_dir, retention)


@dataclass(frozen=True)
class Retention:
    """Which complete checkpoints a job keeps: the `last` N (None: all), and the one with the
    `best` value of a metric (`mode` max or min) among those saved at a step that logged it."""

    last: int | None = None
    best: str | None = None
    mode: str = "max"

    @classmethod
    def of(cls, cfg) -> Retention:
        return cls(cfg.save_keep_last, cfg.save_keep_best, cfg.save_keep_best_mode or "max")


def prune_checkpoints(run_dir: Path, retention: Retention) -> list[str]:
    """Deletes the checkpoints before the newest complete one that `retention` does not
    keep (incomplete ones, left by a killed or failed write, too); returns their tags. Each
    loses its trainer_state.json first, so one whose deletion is cut short is incomplete,
    never a complete checkpoint with files missing."""
    ckpt_dir = run_dir / "checkpoints"
    tags = checkpoint_tags(ckpt_dir)
    complete = [t for t in tags if (ckpt_dir / t / STATE_FILE).is_file()]
    if retention.last is None or not complete:
        return []
    keep = set(complete[-retention.last :])
    if retention.best is not None and (best := best_checkpoint(run_dir, complete, retention)) is not None:
        keep.add(best)
    newest = _step(complete[-1])
    deleted = [t for t in tags if t not in keep and _step(t) < newest]
    for tag in deleted:
        (ckpt_dir / tag / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return deleted


def best_checkpoint(run_dir: Path, tags: list[str], retention: Retention) -> str | None:
    """The tag among `tags` whose step logged the best finite value of `retention.best` in
    metrics.jsonl (on a tie the later), None when none logged it."""
    values: dict[int, float] = {}
    for row in read_metrics(run_dir / METRICS_FILE):
        value = row.get(retention.best)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values[int(row["step"])] = float(value)
    sign = 1 if retention.mode == "max" else -1
    scored = [(sign * values[_step(t)], _step(t), t) for t in tags if _step(t) in values]
    return max(scored)[2] if scored else None


def _step(tag: str) -> int:
    return int(tag.split("_")[1])


def sync_tree(path: Path) -> None:
    """fsync `path` (a file, or a directory and everything under it) and the directory that
    holds it, so what was written (and renamed) survives a crash of the machine."""
    paths = [path]
    if path.is_dir():
        for root, dirs, names in os.walk(path):
            paths += [Path(root) / n for n in (*dirs, *names)]
    for p in [*reversed(paths), path.parent]:  # the entries before the directories that hold them
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno != errno.EINVAL or not p.is_dir():  # some file systems cannot sync a directory
                raise
        finally:
            os.close(fd)


def latest_checkpoint(run_dir: Path) -> tuple[str, dict] | None:
    """Tag and trainer state of the run's last complete checkpoint, if any."""
    ckpt_dir = run_dir / "checkpoints"
    for tag in reversed(checkpoint_tags(ckpt_dir)):
        try:
            return tag, json.loads((ckpt_dir / tag / STATE_FILE).read_text())
        except (OSError, ValueError):  # none, or cut short by a crash: not complete
            continue
    return None


def load_checkpoint(run_dir: Path, learners, tag: str, state: dict) -> None:
    """The learners' part of checkpoint `tag` and the controller's RNG states; the job
    restores the rest of its `state`."""
    learners.call("load_checkpoint", str(run_dir / "checkpoints"), tag)
    version, internal, gauss = state["python_rng"]  # JSON turned the tuples into lists
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))


def save_final_model(run_dir: Path, learners, tokenizer) -> Path:
    """The trained policy as a HF directory, RUN_DIR/final_model."""
    final = run_dir / "final_model"
    learners.call("save_pretrained", str(final))
    tokenizer.save_pretrained(final)
    return final
