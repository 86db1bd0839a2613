"""A pipeline's stages as directories that record their completion, so a rerun skips what
is done and redoes what changed.

A stage works in `<root>/<name>/`: it starts by writing inputs.json with a fingerprint of
its inputs and of the records of the stages it reads, and ends by writing done.json (the
fingerprint, its timing and its result). A stage whose done.json has the current
fingerprint is skipped; a directory left by an interrupted stage is kept when its
inputs.json has the current fingerprint (a training stage resumes from its checkpoints)
and cleared otherwise.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlpost.files import write_json


class Stages:
    def __init__(self, root: Path, print_line: Callable[[str], None]):
        self.root, self.print_line = root, print_line
        self.records: dict[str, dict] = {}  # stage -> its done.json

    def begin(self, name: str, inputs: Any, reads: tuple[str, ...]) -> tuple[Path, dict | None]:
        """The stage's directory, and its record when it is complete with these inputs."""
        directory = self.root / name
        key = hashlib.sha256(
            json.dumps(
                {"inputs": inputs, "reads": {r: self.records[r] for r in reads}}, sort_keys=True, default=str
            ).encode()
        ).hexdigest()[:16]
        self.key = key
        done, started = directory / "done.json", directory / "inputs.json"
        if done.is_file():
            record = json.loads(done.read_text())
            if record["fingerprint"] == key:
                self.records[name] = record
                self.print_line(f"{name}: complete, skipped")
                return directory, record
        if directory.exists() and not (
            started.is_file() and json.loads(started.read_text())["fingerprint"] == key
        ):
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(started, {"fingerprint": key, "inputs": inputs}, indent=1)
        self.print_line(f"{name}: started ({directory})")
        self.started = time.time()
        return directory, None

    def finish(self, name: str, result: dict) -> dict:
        seconds = time.time() - self.started
        record = {"fingerprint": self.key, "finished": time.time(), "seconds": seconds, "result": result}
        write_json(self.root / name / "done.json", record, indent=1)
        self.records[name] = record
        self.print_line(f"{name}: done in {seconds:.0f}s")
        return record

    def run(self, name: str, inputs: Any, reads: tuple[str, ...], build: Callable[[Path], dict]) -> dict:
        """The stage's result: its record's when complete, else `build(directory)`'s."""
        directory, record = self.begin(name, inputs, reads)
        return (record or self.finish(name, build(directory)))["result"]
