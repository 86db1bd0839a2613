"""A sweep directory's bookkeeping: the manifest (sweep.json) the runner writes and the
report reads, and where each run's output and done.json lie."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlpost.errors import ConfigError
from rlpost.sweeps.sweep import Sweep

MANIFEST = "sweep.json"
DONE = "done.json"


def write_manifest(sweep: Sweep) -> None:
    d = sweep.directory
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sweep.path, d / "sweep.yaml")
    manifest = {
        "name": sweep.name,
        "sweep_file": str(sweep.path),
        "base": str(sweep.base),
        "seeds": sweep.seeds,
        "common": sweep.common,
        "arms": sweep.arms,
        "baselines": sweep.baselines,
        "runs": [{"id": r.id, "arm": r.arm, "seed": r.seed} for r in sweep.runs],
    }
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")


def read_manifest(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{sweep_dir} is not a sweep directory (no {MANIFEST})")
    return json.loads(path.read_text())


def run_output_dir(sweep_dir: Path, run_id: str) -> Path:
    return Path(sweep_dir) / "runs" / run_id


def started_run_dir(sweep_dir: Path, run_id: str) -> Path | None:
    """The trainer's run directory of a run that has started (it wrote config.yaml)."""
    out = run_output_dir(sweep_dir, run_id)
    dirs = sorted(p.parent for p in out.glob("*/config.yaml")) if out.is_dir() else []
    return dirs[-1] if dirs else None


def finished(sweep_dir: Path, run_id: str) -> dict | None:
    """done.json of a finished run (run_dir relative to the sweep directory, seconds)."""
    path = run_output_dir(sweep_dir, run_id) / DONE
    return json.loads(path.read_text()) if path.is_file() else None
