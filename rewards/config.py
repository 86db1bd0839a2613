r"""The `reward:` config section: weighted reward components and the scoring pool.

```yaml
reward:
  components:
    - {name: math, weight: 1.0}
    - {name: format, weight: 0.2, args: {pattern: "<think>.*?</think>\\s*<answer>.*?</answer>"}}
    - {name: overlong, weight: 1.0, args: {max_length: 1024, buffer: 256}}
  sources:                 # optional: per data source (`Problem.source`), its own components
    apps:                  # rows whose source is "apps" are scored by these alone
      - {name: code, args: {wall_s: 4}}
      - {name: overlong, weight: 1.0, args: {max_length: 1024, buffer: 256}}
    my_data:
      - {name: function, args: {path: "my_rewards:judge", kwargs: {strict: true}}}
  num_workers: 4
  timeout_s: 10            # per component call on one sample
  batch_timeout_s: null    # per batch; null: 6 x timeout_s, at least 120; 0: no limit
```

A sample's reward is the weighted sum of the component values of its route: the list
under `sources` named by its problem's source, else `components` (the default route,
whose default is the task's own verifier with weight 1). Each value is also reported on
its own (`reward/<label or name>`, the mean over the samples whose route has it). A key
(label or name) means one component: a key used in two routes must be configured the
same in both. Each route's *verifier*, which says whether a sample is correct (value 1),
is its component keyed `task`, else its first per-sample component.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rlpost.rewards.base import SampleReward
from rlpost.rewards.components import COMPONENTS, validate_args
from rlpost.rewards.scoring.sandbox import Limits

# Metric names the trainer already uses under reward/ (and the pool's own).
RESERVED_KEYS = ("mean", "std", "failures", "time_lost_s", "workers_replaced")
# reward.batch_timeout_s when unset: this many reward.timeout_s, and at least BATCH_TIMEOUT_S
BATCH_TIMEOUTS, BATCH_TIMEOUT_S = 6, 120.0


# rlpost.config builds its TrainConfig from this module, so this module cannot import
# rlpost.config (for its Section base) back: the same settings, spelled out.
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def describe_args_error(name: str, err: ValidationError) -> str:
    first = err.errors()[0]
    arg = ".".join(str(p) for p in first["loc"])
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        known = TypeAdapter(COMPONENTS[name].Args).json_schema().get("properties", {})
        return f"unknown arg {arg!r} of reward {name!r}; known: {', '.join(known) or 'none'}"
    msg = first["msg"].removeprefix("Value error, ")
    where = f"arg {arg!r}: " if arg else ""
    got = "" if first["type"] == "value_error" else f" (got {first['input']!r})"
    return f"{where}{msg}{got}"


class ComponentConfig(_Section):
    name: str  # a key of rlpost.rewards.components.COMPONENTS
    weight: float = 1.0  # 0: computed and logged, not added to the reward
    label: str | None = None  # the metric name reward/<label>; default: name
    args: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.label or self.name

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in COMPONENTS:
            known = sorted(COMPONENTS)
            raise ValueError(
                f"unknown reward component {name!r}; known: {', '.join(known)}" + suggest(name, known)
            )
        return name

    @field_validator("weight")
    @classmethod
    def _finite(cls, weight: float) -> float:
        if not math.isfinite(weight):
            raise ValueError(f"weight must be a finite number, got {weight}")
        return weight

    @field_validator("args")
    @classmethod
    def _valid_args(cls, args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is not None:  # else the name's own error is reported
            try:
                validate_args(name, args)
            except ValidationError as e:
                raise ValueError(describe_args_error(name, e)) from None
        return args


def same_component(a: ComponentConfig, b: ComponentConfig) -> bool:
    """Whether two configs of one key score alike (args compared as validated, so that
    a default spelled out equals the default left out)."""
    if (a.name, a.weight) != (b.name, b.weight):
        return False
    return a.args == b.args or validate_args(a.name, a.args) == validate_args(b.name, b.args)


def first_verifier(route: list[ComponentConfig]) -> str | None:
    """The key of a route's verifier: its `task` component, else its first per-sample
    component (None when it has only length components)."""
    sample = [c.key for c in route if issubclass(COMPONENTS[c.name], SampleReward)]
    return "task" if "task" in sample else next(iter(sample), None)


class RewardConfig(_Section):
    components: list[ComponentConfig] = Field(
        default_factory=lambda: [ComponentConfig(name="task")], min_length=1
    )
    sources: dict[str, list[ComponentConfig]] = Field(
        default_factory=dict,
        description="per data source, the components that score its samples instead of `components`",
    )
    num_workers: int = Field(2, gt=0, description="scoring processes (Ray actors in Ray mode)")
    timeout_s: float = Field(10.0, gt=0, description="per component call on one sample")
    batch_timeout_s: float | None = Field(
        None,
        ge=0,
        description="seconds one batch's scoring may take: what is unscored then scores 0 "
        "(counted in reward/failures/timed_out and reward/failures/deadline) and the workers "
        f"still at it are replaced, so hanging rewards cannot queue; null: {BATCH_TIMEOUTS} x "
        f"timeout_s, at least {BATCH_TIMEOUT_S:.0f}; 0: no limit",
    )
    memory_mb: int = Field(
        4096,
        ge=0,
        description="address-space limit of each scoring "
        "process (0: none); a reward that exceeds it raises MemoryError",
    )
    num_cpus_per_worker: float = Field(
        0.0,
        ge=0,
        description="CPUs each Ray scoring actor reserves (0: none, so it never waits for the others)",
    )

    def batch_deadline_s(self) -> float | None:
        """Seconds one batch's scoring may take (batch_timeout_s resolved); None: no limit."""
        if self.batch_timeout_s is None:
            return max(BATCH_TIMEOUTS * self.timeout_s, BATCH_TIMEOUT_S)
        return self.batch_timeout_s or None

    def route(self, source: str) -> list[ComponentConfig]:
        """The components that score a sample from `source`."""
        return self.sources.get(source, self.components)

    def verifier(self, source: str) -> str:
        """The key of the component that says whether a sample from `source` is correct."""
        key = first_verifier(self.route(source))
        if key is None:
            raise ValueError(
                f"the reward components of source {source!r} are all length components; "
                f"none of them can say whether a response is correct"
            )
        return key

    def all_components(self) -> list[ComponentConfig]:
        """Every route's components, each key once, the default route's first."""
        union: dict[str, ComponentConfig] = {}
        for route in (self.components, *self.sources.values()):
            for c in route:
                union.setdefault(c.key, c)
        return list(union.values())

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if self.batch_timeout_s and self.batch_timeout_s < self.timeout_s:
            raise ValueError(
                f"reward.batch_timeout_s ({self.batch_timeout_s}) must be at least reward.timeout_s "
                f"({self.timeout_s}), what one sample may take, or 0 for no limit"
            )
        routes = {"reward.components": self.components}
        routes.update({f"reward.sources.{source}": route for source, route in self.sources.items()})
        first_use: dict[str, tuple[str, ComponentConfig]] = {}
        for path, route in routes.items():
            if not route:
                raise ValueError(f"{path}: no components; list at least one, or leave the source out")
            self._check_route(path, route)
            for i, c in enumerate(route):
                where, seen = first_use.setdefault(c.key, (f"{path}.{i}", c))
                if not same_component(seen, c):
                    raise ValueError(
                        f"{path}.{i}: {c.key!r} is configured differently in {where}; one key is "
                        f"one component in every route: give one a different label"
                    )
            # with sources, each route's samples get an accuracy: it needs a verifier
            if self.sources and first_verifier(route) is None:
                raise ValueError(
                    f"{path}: only length components; add a per-sample component (e.g. task, "
                    f"math, code) to say whether a response is correct"
                )
        return self

    def _check_route(self, path: str, route: list[ComponentConfig]) -> None:
        keys = [c.key for c in route]
        for i, c in enumerate(route):
            if c.key in keys[:i]:
                raise ValueError(
                    f"{path}.{i}: a second component named {c.key!r}; give one a different label"
                )
            if c.key in RESERVED_KEYS:
                raise ValueError(
                    f"{path}.{i}: {c.key!r} is taken by the trainer's "
                    f"reward/{c.key} metric; choose another label"
                )
            if c.name == "code":
                wall = TypeAdapter(Limits).validate_python(c.args).wall_s
                if wall >= self.timeout_s:
                    raise ValueError(
                        f"{path}.{i}.args.wall_s ({wall}) must be below "
                        f"reward.timeout_s ({self.timeout_s}), which bounds all "
                        f"the test runs of one sample"
                    )
