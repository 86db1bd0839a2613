"""A job's run directory and the controller's part of its checkpoints.

    RUN_DIR/config.yaml                          the config with every default written out
    RUN_DIR/checkpoints/<tag>/                   the learners' checkpoint (they write it)
    RUN_DIR/checkpoints/<tag>/trainer_state.json the controller's: step, RNG states, and
                                                 the job's own (its stream position, ...)
    RUN_DIR/final_model/                         the trained policy, a HF directory

trainer_state.json is written after the learners' part and atomically, so a checkpoint
counts as complete exactly when it has one; resume restores the controller's RNG
states, so the draws after a resume are those an uninterrupted run would have made.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlpost.config.load import dump_config
from rlpost.files import write_json
from rlpost.workers.learner import checkpoint_tags

STATE_FILE = "trainer_state.json"


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
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def save_checkpoint(
    run_dir: Path, learners, step: int, state: dict, write_files: Callable[[Path], None] | None = None
) -> None:
    """Checkpoint `step_<step>`: the learners' part, the job's own files (`write_files` of
    the checkpoint's directory), then the controller's (`state`, the step and the RNG states)."""
    tag_dir = run_dir / "checkpoints" / f"step_{step}"
    learners.call("save_checkpoint", str(tag_dir.parent), tag_dir.name)
    if write_files is not None:
        write_files(tag_dir)
    state = {
        "step": step,
        **state,
        "python_rng": random.getstate(),
        "torch_rng": torch.get_rng_state().tolist(),
    }
    # written whole or not at all: a run killed mid-write must still find its last checkpoint
    write_json(tag_dir / STATE_FILE, state)


def latest_checkpoint(run_dir: Path) -> tuple[str, dict] | None:
    """Tag and trainer state of the run's last complete checkpoint, if any."""
    ckpt_dir = run_dir / "checkpoints"
    tags = [t for t in checkpoint_tags(ckpt_dir) if (ckpt_dir / t / STATE_FILE).is_file()]
    if not tags:
        return None
    return tags[-1], json.loads((ckpt_dir / tags[-1] / STATE_FILE).read_text())


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
