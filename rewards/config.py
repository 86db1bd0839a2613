"""The `reward:` config section: weighted reward components and the scoring pool.

```yaml
reward:
  components:
    - {name: math, weight: 1.0}
    - {name: format, weight: 0.2, args: {pattern: "<think>.*?</think>\\s*<answer>.*?</answer>"}}
    - {name: overlong, weight: 1.0, args: {max_length: 1024, buffer: 256}}
  num_workers: 4
  timeout_s: 10
```

A sample's reward is the weighted sum of its component values; each value is
also reported on its own (`reward/<label or name>`). The default is the task's
own verifier with weight 1.
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

from rlpost.rewards.components import COMPONENTS, validate_args
from rlpost.rewards.scoring.sandbox import Limits

# Metric names the trainer already uses under reward/.
RESERVED_KEYS = ("mean", "std", "failures")


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


class RewardConfig(_Section):
    components: list[ComponentConfig] = Field(
        default_factory=lambda: [ComponentConfig(name="task")], min_length=1
    )
    num_workers: int = Field(2, gt=0, description="scoring processes (Ray actors in Ray mode)")
    timeout_s: float = Field(10.0, gt=0, description="per component call on one sample")
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

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        keys = [c.key for c in self.components]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                raise ValueError(
                    f"reward.components.{i}: a second component named {key!r}; give one a different label"
                )
            if key in RESERVED_KEYS:
                raise ValueError(
                    f"reward.components.{i}: {key!r} is taken by the trainer's "
                    f"reward/{key} metric; choose another label"
                )
        for i, c in enumerate(self.components):
            if c.name == "code":
                wall = TypeAdapter(Limits).validate_python(c.args).wall_s
                if wall >= self.timeout_s:
                    raise ValueError(
                        f"reward.components.{i}.args.wall_s ({wall}) must be below "
                        f"reward.timeout_s ({self.timeout_s}), which bounds all "
                        f"the test runs of one sample"
                    )
        return self
