"""YAML file + dotted command-line overrides -> a typed config.

Every error is a `ConfigError` whose message names the file and the dotted key.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rlpost.config.rl import TrainConfig
from rlpost.config.yaml_file import non_finite_key, read_yaml_file
from rlpost.errors import ConfigError
from rlpost.rewards import build_task

M = TypeVar("M", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    got = first.get("input")
    where = f"key '{key}': " if key else ""
    msg = first["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        if isinstance(first.get("ctx", {}).get("error"), ConfigError):  # it names its keys
            return f"{source}: {msg}"
        return f"{source}: {where}{msg}"
    return f"{source}: {where}{msg} (got {got!r})"


def config_source(path: str | os.PathLike | None, overrides: list[str] = ()) -> str:
    """How errors name a config: its file (or <defaults>), marked when overrides apply."""
    source = str(path) if path is not None else "<defaults>"
    return source + " (with overrides)" if overrides else source


def read_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> tuple[dict, str]:
    """The YAML tree of `path` (empty when None) with the overrides applied, and the source
    to name in errors."""
    source = config_source(path)
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {source}")
        tree = read_yaml_file(p, source)
    for text in overrides:
        key, value = parse_override(text)
        apply_override(tree, key, value)
    return tree, config_source(path, overrides)


def validate_config(schema: type[M], tree: dict, source: str) -> M:
    """`tree` as a `schema` (TrainConfig, or an offline job's config); a ConfigError names the
    key, as it does for a float setting that is inf or nan (`non_finite_key`)."""
    try:
        cfg = schema.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None
    found = non_finite_key(cfg)
    if found is not None:
        key, value = found
        hint = "" if math.isnan(value) else "; for no bound, where the key allows one, use null"
        raise ConfigError(f"{source}: key '{key}': must be a finite number (got {value}){hint}")
    return cfg


def read_train_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """Load YAML (or start from defaults when path is None), apply overrides, validate the
    schema and the names (`rlpost.jobs.preflight.load_config` also checks disk and packages)."""
    tree, source = read_config(path, overrides)
    cfg = validate_config(TrainConfig, tree, source)
    check_names(cfg, source)
    return cfg


def check_names(cfg: TrainConfig, source: str) -> None:
    """The task a config names, and its arguments: checked now, not in a worker (the
    algorithm's section is typed by its name when the config is validated)."""
    try:
        build_task(cfg.task.name, cfg.task.args)  # checks the name and the args
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def dump_config(cfg: TrainConfig) -> str:
    tree = cfg.model_dump(mode="json")
    return yaml.safe_dump(tree, sort_keys=False)
