"""Reading a config file strictly, and finding a setting that is not a finite number.

A config file must be UTF-8 YAML whose top level is a mapping with at least one key (an
empty file, `null` or binary bytes is a mistake, not "all defaults"), and a mapping may not
name a key twice (YAML itself would keep the last one silently). Every error is a
`ConfigError` naming the file (and the line)."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from rlpost.errors import ConfigError

MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key a mapping names twice (a `<<` merge may be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, key_node.start_mark.line + 1)
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    pass
        return super().construct_mapping(node, deep=deep)


def read_yaml_file(path: Path, source: str) -> dict:
    """The mapping a config file holds; a ConfigError names `source` otherwise."""
    data = path.read_bytes()
    if not data.strip():
        raise ConfigError(f"{source}: the file is empty; a config needs at least one key")
    if b"\0" in data:
        raise ConfigError(f"{source}: not a text file (it holds NUL bytes); expected YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        byte = data[e.start]
        raise ConfigError(f"{source}: not UTF-8 text (byte {byte:#04x} at offset {e.start})") from None
    try:
        tree = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader
    except _DuplicateKey as e:
        raise ConfigError(f"{source}: line {e.line}: key {e.key!r} is given twice") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}:{line} is not valid YAML") from None
    if tree is None:
        raise ConfigError(f"{source}: the file holds no settings (YAML null); a config needs a key")
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: top level must be a mapping of keys")
    return tree


def _free_form(annotation: Any) -> bool:
    """A field of user data (task.args, a reward's kwargs: `Any` values), not a setting."""
    return annotation is Any or any(_free_form(a) for a in typing.get_args(annotation))


# A float field may take +-inf (meaning "no bound") when its Field says so:
# Field(..., json_schema_extra=UNBOUNDED_OK). nan is never a setting.
UNBOUNDED_OK = {"inf_allowed": True}


def _inf_allowed(field: Any) -> bool:
    return isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("inf_allowed", False)


def non_finite_key(value: Any, key: str = "", inf_ok: bool = False) -> tuple[str, float] | None:
    """The dotted key and value of the first float setting in a validated config that is
    nan, or inf where its field does not allow it (most do not: an unbounded setting is
    null), else None. Fields of free-form user data (typed `Any`) are not settings and are
    not looked into."""
    if isinstance(value, float):
        return None if math.isfinite(value) or (inf_ok and not math.isnan(value)) else (key, value)
    if isinstance(value, BaseModel):
        items = [
            (name, getattr(value, name), _inf_allowed(field))
            for name, field in type(value).model_fields.items()
            if not _free_form(field.annotation)
        ]
    elif isinstance(value, dict):
        items = [(k, v, False) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(i, v, False) for i, v in enumerate(value)]
    else:
        return None
    for name, item, inf in items:
        found = non_finite_key(item, f"{key}.{name}" if key else str(name), inf)
        if found is not None:
            return found
    return None
