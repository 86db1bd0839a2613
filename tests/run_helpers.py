"""Running the real CLI in a subprocess and reading what a run left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
# Wall-clock figures differ between two runs of the same job; everything else must not.
UNTIMED = ("time", "time/", "tokens_per_sec")


def train_cmd(out_dir: Path, *overrides: str, config: Path = TINY) -> list[str]:
    return [sys.executable, "-m", "rlpost.cli", "train", str(config), f"output_dir={out_dir}", *overrides]


def run_train(out_dir: Path, *overrides: str, config: Path = TINY, timeout: int = 600) -> Path:
    proc = subprocess.run(
        train_cmd(out_dir, *overrides, config=config),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return only_run_dir(out_dir)


def only_run_dir(out_dir: Path) -> Path:
    runs = [p for p in out_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def read_metrics(run_dir: Path) -> dict[int, dict]:
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if not k.startswith(UNTIMED) and k != "step"}
        )
    return rows


def assert_gradients_match(learners, reference: dict, rtol: float, atol: float) -> None:
    """The learners' summed gradients (rank 0, ZeRO-0) equal `reference`; then cleared."""
    import torch

    grads = learners.call("gradients")[0]
    learners.call("zero_grad")
    assert set(grads) == set(reference)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=rtol, atol=atol, msg=name)
