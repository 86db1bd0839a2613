"""Algorithm modules (installed as rlpost.algorithms): the registry, by name or "pkg.module:Class".

One file and one `ALGORITHMS` entry each; a user's algorithm needs no entry: its import
path in `algorithm.name`. Each job runs one kind (algorithms/base.py): `rlpost train` a
PolicyGradient, `rlpost sft` a TokenLoss, `rlpost dpo` a PairLoss.
"""

from __future__ import annotations

import importlib

from pydantic import ValidationError

from rlpost.algorithms.base import (
    AlgoConfig,
    Algorithm,
    MiniBatchView,
    Needs,
    PairLoss,
    PolicyGradient,
    SamplingRule,
    TokenLoss,
    TokenTensors,
)
from rlpost.algorithms.ceeh import CEEH
from rlpost.algorithms.cispo import CISPO
from rlpost.algorithms.covariance import ClipCov, KLCov
from rlpost.algorithms.dppo import DPPO
from rlpost.algorithms.gmpo import GMPO
from rlpost.algorithms.grpo import GRPO
from rlpost.algorithms.gspo import GSPO, GSPOToken
from rlpost.algorithms.hapo import HAPO
from rlpost.algorithms.off_policy import Correction, behaviour_weights
from rlpost.algorithms.pairs import PairSums
from rlpost.algorithms.ppo import PPO
from rlpost.algorithms.preference import Preference, chunked_critical_weights
from rlpost.algorithms.prime import PRIME
from rlpost.algorithms.pure import PURE
from rlpost.algorithms.reweighting import reweight_metrics, sample_multipliers
from rlpost.algorithms.sapo import SAPO
from rlpost.algorithms.sft import SFT
from rlpost.algorithms.sstoken import SSToken
from rlpost.algorithms.token_baseline import TokenBaseline
from rlpost.algorithms.vineppo import VinePPO
from rlpost.errors import ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (GRPO, HAPO, GSPO, GSPOToken, CISPO, GMPO, SAPO, DPPO, ClipCov, KLCov)
    + (PPO, VinePPO, PURE, PRIME, TokenBaseline, CEEH, Preference, SFT)
    + (SSToken,)
}
KINDS = (PairLoss, PolicyGradient, TokenLoss)  # most specific first: a PolicyGradient is a TokenLoss


def kind_of(cls: type[Algorithm]) -> type[Algorithm]:
    return next(kind for kind in KINDS if issubclass(cls, kind))


def _imported(path: str, key: str = "algorithm.name") -> type:
    """The class of an import path "pkg.module:Class"; a ConfigError naming `key` otherwise."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise  # a module the user's module imports is missing: its traceback says which
        raise ConfigError(f"key '{key}': no module {module_name!r} (from {path!r})") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ConfigError(f"key '{key}': module {module_name!r} has no class {attr!r}")
    return cls


def algorithm_class(name: str, kind: type[Algorithm] | None = None) -> type[Algorithm]:
    """The class a registry name or an import path "pkg.module:Class" names, checked to be of
    `kind` (None: any kind); a one-line ConfigError naming `algorithm.name` otherwise."""
    if ":" in name:
        cls = _imported(name)
        if not issubclass(cls, Algorithm):
            raise ConfigError(
                f"key 'algorithm.name': {name} is not an algorithm (a subclass of "
                f"{(kind or Algorithm).__module__}.{(kind or Algorithm).__name__})"
            )
    elif name in ALGORITHMS:
        cls = ALGORITHMS[name]
    else:
        known = sorted(n for n, c in ALGORITHMS.items() if kind is None or kind_of(c) is kind)
        raise ConfigError(
            f"key 'algorithm.name': unknown algorithm {name!r}; known: "
            f"{', '.join(known)} (or pkg.module:Class)"
        )
    if kind is not None and kind_of(cls) is not kind:
        names = ", ".join(n for n, c in ALGORITHMS.items() if kind_of(c) is kind)
        raise ConfigError(
            f"key 'algorithm.name': {name} is {kind_of(cls).kind_name}; "
            f"{kind.runs} ({names}, or pkg.module:Class)"
        )
    return cls


def build_algorithm_config(name: str, params: dict, kind: type[Algorithm] | None = None) -> AlgoConfig:
    cls = algorithm_class(name, kind)
    try:
        return cls.Config.model_validate(params)
    except ValidationError as e:
        first = e.errors()[0]
        key = "algorithm." + ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown key '{key}' for algorithm {name!r}") from None
        if first["type"] == "value_error":  # a check across keys: its message names them
            raise ConfigError(first["msg"].removeprefix("Value error, ")) from None
        raise ConfigError(f"key '{key}': {first['msg']} (got {first.get('input')!r})") from None


def build_algorithm(name: str, params: dict, kind: type[Algorithm] | None = None) -> Algorithm:
    return algorithm_class(name, kind)(build_algorithm_config(name, params, kind))


DEFAULT_SAMPLING_RULE = "rlpost.algorithms.hapo:TemperatureRule"  # checkpoints before "rule" was written


def sampling_rule_from_dict(d: dict) -> SamplingRule:
    """The rule whose `to_dict()` gave `d`; the class comes from d["rule"]."""
    return _imported(d.get("rule", DEFAULT_SAMPLING_RULE), "sampling_rule.rule").from_dict(d)


# chunked_critical_weights: cDPO's contrastive estimation, which the runtime's contrast role runs
# before any algorithm object exists; Correction and behaviour_weights: the learner's off-policy
# weights, a runtime setting (TrainConfig.off_policy), not an algorithm's; sample_multipliers and
# reweight_metrics: the learners' loss-based sample reweighting, a runtime setting (`reweighting:`)
__all__ = [
    "ALGORITHMS",
    "AlgoConfig",
    "Algorithm",
    "Correction",
    "MiniBatchView",
    "Needs",
    "PairLoss",
    "PairSums",
    "PolicyGradient",
    "SamplingRule",
    "TokenLoss",
    "TokenTensors",
    "algorithm_class",
    "behaviour_weights",
    "build_algorithm",
    "build_algorithm_config",
    "chunked_critical_weights",
    "kind_of",
    "reweight_metrics",
    "sample_multipliers",
    "sampling_rule_from_dict",
]
