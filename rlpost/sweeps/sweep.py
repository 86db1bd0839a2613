"""Sweep files: a base config, a grid (or named arms) of overrides, and seeds -> runs.

```yaml
name: lr-and-agg              # the sweep directory <output_dir>/<name>, the W&B group (default: file stem)
base: ../quickstart.yaml      # the base config, relative to this file
seeds: [0, 1, 2]              # every arm runs once per seed (default: the base config's seed)
overrides: {steps: 40}        # applied to every run (optional)
grid:                         # an arm per combination of these values
  algorithm.loss_agg: [token-mean, balanced]
  learner.lr: [1.0e-4, 3.0e-4]
# arms:                       # or, instead of a grid, arms: label -> overrides
#   token-mean: {algorithm.loss_agg: token-mean}    (or a list of overrides, labelled by them)
baseline: {algorithm.loss_agg: token-mean}   # optional: what the report compares each arm to,
                              # seed by seed: an arm's label, or values of varied keys (each
                              # arm against the arm that differs from it in those keys only)
output_dir: runs/sweeps       # optional
```

Keys are dotted config keys with YAML values, as on the `rlpost train` command
line. A key given twice, a key set both for every run and per arm (or one that
contains another, `learner` and `learner.lr`), and the keys the sweep sets
itself (`seed`, `output_dir`, `resume`, `tracking.group/run_name/tags`) are
errors. Every run's config is resolved and validated with `load_config` before
anything runs, so a typo stops the sweep with one line naming the file and key.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlpost.config.load import parse_override
from rlpost.config.rl import TrainConfig
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config

SWEEP_KEYS = ("name", "base", "seeds", "overrides", "grid", "arms", "baseline", "output_dir")
# Set by the sweep for every run; a sweep file must not set them.
RESERVED = ("seed", "output_dir", "resume", "tracking.group", "tracking.run_name", "tracking.tags")
WANDB_TAG_MAX = 64  # W&B rejects longer tags


def yaml_text(value: Any) -> str:
    """`value` as flow-style YAML that `parse_override` reads back as `value`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return text.removesuffix("...").strip()  # PyYAML ends a lone scalar with '...'


def overlaps(a: str, b: str) -> bool:
    """Whether setting both keys is ambiguous: the same key, or one inside the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


@dataclass
class Run:
    arm: str
    seed: int
    arm_overrides: dict[str, Any]  # what this arm varies

    @property
    def id(self) -> str:
        """Directory name: the arm label made path-safe, and the seed."""
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", self.arm) + f"-seed{self.seed}"

    @property
    def display_name(self) -> str:
        return f"{self.arm},seed={self.seed}"

    def tags(self) -> list[str]:
        tags = [f"{k}={yaml_text(v)}" for k, v in self.arm_overrides.items()]
        tags += [f"arm={self.arm}", f"seed={self.seed}"]
        return [t[:WANDB_TAG_MAX] for t in dict.fromkeys(tags)]


@dataclass
class Sweep:
    path: Path
    name: str
    base: Path
    seeds: list[int]
    common: dict[str, Any]  # every run: the file's `overrides`, then the command line's
    arms: dict[str, dict[str, Any]]  # label -> overrides, in file order
    output_dir: Path
    runs: list[Run] = field(default_factory=list)
    baselines: dict[str, str] = field(default_factory=dict)  # arm -> the arm it is compared to

    @property
    def directory(self) -> Path:
        return self.output_dir / self.name

    def overrides(self, run: Run) -> list[str]:
        """The `key=value` overrides of one run on top of the base config."""
        sets = {
            **self.common,
            **run.arm_overrides,
            "seed": run.seed,
            "output_dir": str(self.directory / "runs" / run.id),
            "tracking.group": self.name,
            "tracking.run_name": run.display_name,
            "tracking.tags": run.tags(),
        }
        return [f"{k}={yaml_text(v)}" for k, v in sets.items()]

    def resolve(self, run: Run) -> TrainConfig:
        try:
            return load_config(self.base, self.overrides(run))
        except ConfigError as e:
            raise ConfigError(f"{self.path}: run {run.id}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """Rejects a mapping key given twice (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping
)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: line {e.line}: key '{e.key}' is given twice") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}:{f' line {mark.line + 1}' if mark else ''} is not valid YAML") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    unknown = [k for k in tree if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'; a sweep file has {', '.join(SWEEP_KEYS)}")
    return tree


def _mapping(path: Path, where: str, value: Any) -> dict[str, Any]:
    """A mapping of dotted config keys, none of which contains another."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{path}: key '{where}' must be a mapping of config keys to values")
    for a, b in itertools.combinations(value, 2):
        if overlaps(a, b):
            raise ConfigError(f"{path}: key '{where}': '{a}' and '{b}' set the same key")
    for key in value:
        if key in RESERVED:
            raise ConfigError(
                f"{path}: key '{where}.{key}': set by the sweep for every run"
                + (" (list seeds under 'seeds')" if key == "seed" else "")
            )
    return dict(value)


def _label(overrides: dict[str, Any]) -> str:
    """`loss_agg=balanced,lr=0.0001`: the keys' last parts, or whole keys where two share one."""
    last = [k.rsplit(".", 1)[-1] for k in overrides]
    return (
        ",".join(
            f"{short if last.count(short) == 1 else key}={yaml_text(v)}"
            for key, short, v in zip(overrides, last, overrides.values())
        )
        or "base"
    )


def _arms(path: Path, tree: dict) -> dict[str, dict[str, Any]]:
    grid, arms = tree.get("grid"), tree.get("arms")
    if grid is not None and arms is not None:
        raise ConfigError(f"{path}: give either 'grid' or 'arms', not both")
    if grid is not None:
        grid = _mapping(path, "grid", grid)
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: key 'grid.{key}' must be a non-empty list of values")
        combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        labelled = [(_label(c), c) for c in combos]
    elif isinstance(arms, dict):
        labelled = [(str(label), _mapping(path, f"arms.{label}", o)) for label, o in arms.items()]
    elif isinstance(arms, list) and arms:
        labelled = [(_label(o), o) for o in (_mapping(path, f"arms[{i}]", a) for i, a in enumerate(arms))]
    elif arms is None:
        labelled = [("base", {})]
    else:
        raise ConfigError(
            f"{path}: key 'arms' must be a mapping of label -> overrides, or a non-empty list of overrides"
        )
    out: dict[str, dict[str, Any]] = {}
    for label, overrides in labelled:
        if label in out:
            raise ConfigError(f"{path}: two arms are both labelled '{label}'")
        out[label] = overrides
    return out


def _baselines(path: Path, value: Any, arms: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each arm's baseline arm (none for the baselines themselves)."""
    if value is None:
        return {}
    if isinstance(value, str):
        if value not in arms:
            raise ConfigError(f"{path}: key 'baseline': no arm is labelled '{value}'")
        return {arm: value for arm in arms if arm != value}
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            f"{path}: key 'baseline' must be an arm's label or a mapping of varied keys to values"
        )
    out = {}
    for arm, overrides in arms.items():
        for key in value:
            if key not in overrides:
                raise ConfigError(f"{path}: key 'baseline.{key}': arm '{arm}' does not vary it")
        want = {**overrides, **value}
        match = next((a for a, o in arms.items() if o == want), None)
        if match is None:
            raise ConfigError(
                f"{path}: key 'baseline': no arm has {_label(want)}, the baseline of arm '{arm}'"
            )
        if match != arm:
            out[arm] = match
    return out


def load_sweep(
    path: str | Path, cli_overrides: list[str] = (), name: str | None = None, output_dir: str | None = None
) -> Sweep:
    """Read a sweep file, expand it into runs and validate every run's config.

    `cli_overrides` (`key=value`, as for `rlpost train`) apply to every run after
    the file's `overrides`; `name` and `output_dir` replace the file's."""
    path = Path(path)
    tree = _read(path)
    common = _mapping(path, "overrides", tree.get("overrides"))
    arms = _arms(path, tree)
    for text in cli_overrides:
        key, value = parse_override(text)
        dotted = ".".join(key)
        if dotted in RESERVED:
            raise ConfigError(f"override '{text}': '{dotted}' is set by the sweep for every run")
        for arm in arms.values():
            clash = next((k for k in arm if overlaps(k, dotted)), None)
            if clash:
                raise ConfigError(f"override '{text}': {path} varies '{clash}' per arm")
        common = {k: v for k, v in common.items() if not overlaps(k, dotted)}
        common[dotted] = value
    for label, overrides in arms.items():
        for key in overrides:
            clash = next((k for k in common if overlaps(k, key)), None)
            if clash:
                raise ConfigError(
                    f"{path}: key '{key}' of arm '{label}' is also set for every "
                    f"run ('{clash}' under 'overrides')"
                )

    if "base" not in tree:
        raise ConfigError(f"{path}: key 'base' (the base config file) is missing")
    base = Path(os.path.normpath(path.parent / str(tree["base"])))
    seeds = tree.get("seeds")
    if seeds is None:
        seeds = [load_config(base).seed]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"{path}: key 'seeds' must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: key 'seeds' lists a seed twice")
    sweep_name = name or str(tree.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._=,+-]+", sweep_name):
        raise ConfigError(f"{path}: key 'name': '{sweep_name}' is not a plain directory name")
    sweep = Sweep(
        path=path,
        name=sweep_name,
        base=base,
        seeds=list(seeds),
        common=common,
        arms=arms,
        output_dir=Path(output_dir or tree.get("output_dir") or "runs/sweeps"),
        baselines=_baselines(path, tree.get("baseline"), arms),
    )
    # seed-major: a sweep stopped half-way has every arm at its first seeds
    sweep.runs = [Run(label, seed, overrides) for seed in sweep.seeds for label, overrides in arms.items()]
    ids = [r.id for r in sweep.runs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(
            f"{path}: two arms map to the same run directory '{dup}'; "
            f"give them labels that differ in letters or digits"
        )
    for run in sweep.runs:
        sweep.resolve(run)
    return sweep
