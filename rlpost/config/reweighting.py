"""The `reweighting:` section of `rlpost train`, `rlpost sft` and `rlpost dpo`: dynamic
loss-based sample reweighting (docs/algorithms.md section 8), which works with any loss."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_serializer, model_validator

from rlpost.config.base import Section
from rlpost.errors import ConfigError


class ReweightingConfig(Section):
    scheme: Literal["none", "linupper", "mid", "extremes"] = Field(
        "none",
        description="f(h) of a sample's min-max normalised loss h in [-1, 1]: linupper min(h + 1, 1), "
        "mid 1 - h^2, extremes |h|; each sample's share of the loss is multiplied by N softmax(f / "
        "temperature) over the optimizer step's samples; none: off (no extra forward pass)",
    )
    temperature: float = Field(0.4, gt=0, description="tau of the softmax over the step's samples")
    burn_in_steps: int = Field(
        0,
        ge=0,
        description="optimizer steps trained unweighted first (rlpost train: one per mini-batch, "
        "learner.epochs x rollout batch / learner.mini_batch_size per RL step)",
    )

    @model_validator(mode="after")
    def _nothing_set_while_off(self) -> ReweightingConfig:
        if self.scheme == "none":
            for key in ("temperature", "burn_in_steps"):
                if key in self.model_fields_set:
                    raise ConfigError(
                        f"reweighting.{key} is set but reweighting.scheme is 'none'; "
                        "set reweighting.scheme: linupper, mid or extremes"
                    )
        return self

    # off, the other keys hold their defaults and are left out of a dump (config.yaml): written
    # out they would be refused when the dump is loaded again (resume)
    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        out = handler(self)
        return {"scheme": out["scheme"]} if self.scheme == "none" else out
