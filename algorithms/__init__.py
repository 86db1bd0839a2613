"""Algorithm modules (installed as rlpost.algorithms). One file and one entry each."""
from __future__ import annotations

from pydantic import ValidationError

from rlpost.algorithms.base import AlgoConfig, Algorithm, MiniBatchView, Needs, TokenTensors
from rlpost.algorithms.grpo import GRPO
from rlpost.algorithms.hapo import HAPO
from rlpost.algorithms.preference import Preference
from rlpost.algorithms.sft import SFT

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (GRPO, HAPO, Preference, SFT)}


def build_algorithm_config(name: str, params: dict) -> AlgoConfig:
    from rlpost.errors import ConfigError

    if name not in ALGORITHMS:
        raise ConfigError(f"key 'algorithm.name': unknown algorithm {name!r}; "
                          f"known: {', '.join(sorted(ALGORITHMS))}")
    try:
        return ALGORITHMS[name].Config.model_validate(params)
    except ValidationError as e:
        first = e.errors()[0]
        key = "algorithm." + ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown key '{key}' for algorithm {name!r}") from None
        if first["type"] == "value_error":  # a check across keys: its message names them
            raise ConfigError(first["msg"].removeprefix("Value error, ")) from None
        raise ConfigError(f"key '{key}': {first['msg']} (got {first.get('input')!r})") from None


def build_algorithm(name: str, params: dict) -> Algorithm:
    return ALGORITHMS[name](build_algorithm_config(name, params))


__all__ = ["ALGORITHMS", "AlgoConfig", "Algorithm", "MiniBatchView", "Needs", "TokenTensors",
           "build_algorithm", "build_algorithm_config"]
