"""Prompts read from files (`data.train_files`) as a task: no generator and no verifier of
their own; their rewards are the configured components (math, code, function), routed by
each row's source."""

from __future__ import annotations

import string
from dataclasses import dataclass

from rlpost.rewards.base import Problem, Task


@dataclass
class FileRows(Task):
    # the tiny model's character tokenizer; other characters map to its unknown token
    alphabet = string.printable

    def problems(self, size: int, seed: int) -> list[Problem]:
        raise TypeError(
            "rows read from files are not generated: they are read by rlpost/data/prompt_files.py"
        )

    def score(self, response: str, problem: Problem) -> float:
        raise TypeError(
            "rows read from files have no task verifier; name a reward component (math, code, function)"
        )
