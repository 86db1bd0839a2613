"""Every task of the reasoning-gym package, by name: `task.name: reasoning_gym:<dataset>`.

Problems are generated offline from the seed (`reasoning_gym.create_dataset(
dataset, size=N, seed=S, **task.args)`) and scored with the dataset's own
`score_answer(answer, entry)`. The answer is the content of the response's last
<answer>...</answer>, or the whole stripped response when it has none.
"""

from __future__ import annotations

import difflib
import functools
import json
import string
from dataclasses import dataclass, field
from typing import Any

from rlpost.rewards.answers import answer_tag
from rlpost.rewards.base import Problem, Task

PREFIX = "reasoning_gym:"


def dataset_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


@functools.cache
def _scorer(dataset: str, config_json: str):
    """A dataset instance for its score_answer (per process; never pickled)."""
    import reasoning_gym

    return reasoning_gym.create_dataset(dataset, size=1, seed=0, **json.loads(config_json))


@dataclass
class ReasoningGym(Task):
    dataset: str
    config: dict[str, Any] = field(default_factory=dict)  # the dataset's config fields

    # the tiny model's character tokenizer; other characters map to its unknown token
    alphabet = string.printable

    def __post_init__(self):
        """Fail now, naming the config key, on an unknown dataset or bad config fields."""
        from rlpost.errors import ConfigError

        names = dataset_names()
        if self.dataset not in names:
            close = difflib.get_close_matches(self.dataset, names, n=3)
            hint = (
                f"did you mean {', '.join(PREFIX + c for c in close)}?"
                if close
                else f"known: {', '.join(names)}"
            )
            raise ConfigError(f"key 'task.name': unknown reasoning-gym task {self.dataset!r}; {hint}")
        try:
            self.create(size=1, seed=0)
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"key 'task.args': reasoning-gym task {self.dataset!r}: {e}") from None

    def create(self, size: int, seed: int):
        import reasoning_gym

        return reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self.config)

    def problems(self, size: int, seed: int) -> list[Problem]:
        return [
            Problem(prompt=entry["question"], answer=str(entry["answer"]), meta={"entry": entry})
            for entry in self.create(size, seed)
        ]

    def scorer(self):
        return _scorer(self.dataset, json.dumps(self.config, sort_keys=True))

    def prepare(self) -> None:
        self.scorer()

    def score(self, response: str, problem: Problem) -> float:
        tagged = answer_tag(response)
        answer = tagged if tagged is not None else response.strip()
        return float(self.scorer().score_answer(answer, problem.meta["entry"]))
