"""`warmup.reuse`: one supervised warm-up per seed, shared by the runs that would train
the same one.

An ablation's arms differ in their RL choices and start from the same warm-up; training
it once per seed instead of once per run halves a testbed sweep. A finished warm-up is
kept in $RLPOST_CACHE/warmups/<key>, where the key is a hash of everything the warm-up
reads from the config: the seed, `model`, `task`, `warmup`, and `learner` without its
RL-only keys. The rlpost version is in the key too, but not the code itself: after
changing the warm-up's code, clear the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import rlpost
from rlpost.config.rl import TrainConfig
from rlpost.model.load import cache_root

# learner keys the warm-up does not read (it has its own lr and schedule in `warmup`)
RL_ONLY = {"lr", "lr_warmup_steps", "lr_schedule", "mini_batch_size", "epochs", "offload_optimizer"}
DONE = "tokenizer_config.json"  # the warm-up writes it last


def warmup_spec(cfg: TrainConfig) -> dict:
    """Everything the warm-up reads from the config, and the version."""
    spec = cfg.model_dump(mode="json", include={"seed", "model", "task", "warmup"})
    spec["learner"] = cfg.learner.model_dump(mode="json", exclude=RL_ONLY)
    spec["rlpost"] = rlpost.__version__
    return spec


def warmup_key(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(warmup_spec(cfg), sort_keys=True).encode()).hexdigest()[:16]


def shared_warmup(cfg: TrainConfig) -> Path:
    return cache_root() / "warmups" / warmup_key(cfg)


def link_or_copy(src: Path, dst: Path) -> None:
    """`src`'s files into `dst` as hard links (copies across file systems): the run
    directory keeps its own warm-up, and a 100 GB model is not written twice."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


def place(src: Path, dst: Path, note: dict | None = None) -> None:
    """`src` linked into a directory beside `dst` (with `note` as rlpost_warmup.json) and
    renamed to `dst`, so `dst` is never seen half-filled; an existing `dst` stays (of two
    runs that finish together, the first one's)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        link_or_copy(src, tmp)
        if note is not None:
            (tmp / "rlpost_warmup.json").write_text(json.dumps(note, indent=1))
        try:
            tmp.rename(dst)
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def take_shared(cfg: TrainConfig, out_dir: Path) -> Path | None:
    """Fill `out_dir` from the shared warm-up if a finished one exists; its path, else None."""
    shared = shared_warmup(cfg)
    if not (shared / DONE).is_file():
        return None
    shutil.rmtree(out_dir, ignore_errors=True)  # an unfinished warm-up of an earlier start
    place(shared, out_dir)
    return shared


def share(cfg: TrainConfig, out_dir: Path) -> None:
    """Offer the finished warm-up in `out_dir` to later runs."""
    place(out_dir, shared_warmup(cfg), note=warmup_spec(cfg))
