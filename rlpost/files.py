"""JSON and JSONL files written whole or not at all.

Each goes to a temporary name, then is renamed over the target: a run killed mid-write
leaves the previous file, never half of a new one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, value: Any, indent: int | None = None, durable: bool = False) -> None:
    """`durable`: the new file's bytes reach the disk (fsync) before it is renamed into
    place, so a machine that crashes right after cannot leave an empty file at `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, indent=indent))
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    """Every row of a JSONL file this project wrote (a broken line is an error, unlike
    `tracking.read_metrics`, which reads what a killed run may have cut short)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
