"""The reward components a `reward:` config can name (one file each), and how their args
are checked."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from rlpost.rewards.base import LengthReward, SampleReward
from rlpost.rewards.components.code_tests import CodeTests
from rlpost.rewards.components.function import UserFunction
from rlpost.rewards.components.math_answer import MathAnswer
from rlpost.rewards.components.shaping import Format, Overlong, TargetLength
from rlpost.rewards.components.task_score import TaskScore

COMPONENTS: dict[str, type[SampleReward] | type[LengthReward]] = {
    "task": TaskScore,
    "math": MathAnswer,
    "code": CodeTests,
    "format": Format,
    "function": UserFunction,
    "length": TargetLength,
    "overlong": Overlong,
}


def validate_args(name: str, args: dict[str, Any]) -> Any:
    """The component's validated args (raises pydantic.ValidationError)."""
    return TypeAdapter(COMPONENTS[name].Args).validate_python(args)
