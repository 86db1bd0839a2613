"""Typed configs of the offline jobs, `rlpost sft CONFIG` and `rlpost dpo CONFIG`.

They share the RL config's sections where the meaning is the same (`model`, `tracking`,
the learner's keys) and its loader and error style (`rlpost.config.read_config` /
`validate_config`: one `ConfigError` naming the file and the dotted key). What differs:

- `data`: the dataset file or directory (rlpost/data/datasets.py describes the formats);
- `batch_size` pairs (dpo) or examples (sft) per optimizer step, and `epochs` over the
  training data (or `steps`), instead of rollouts and mini-batches;
- `algorithm`: the loss's own config (the registry's `preference` or `sft`), with no `name`;
- `learner` and `ray` without the RL-only keys (mini-batches and epochs of a rollout batch,
  rollout placement).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SerializeAsAny, create_model, field_serializer, field_validator, model_validator

from rlpost.algorithms.base import AlgoConfig, Algorithm, PairLoss, TokenLoss
from rlpost.config.base import BestMode, keep_best_field, keep_last_field, retention_problem
from rlpost.config.load import read_config, validate_config
from rlpost.config.reweighting import ReweightingConfig
from rlpost.config.sections import (
    LearnerConfig,
    ModelConfig,
    RayConfig,
    Section,
    TrackingConfig,
    algorithm_section,
)
from rlpost.errors import ConfigError


def _without(model: type[Section], name: str, *dropped: str) -> type[Section]:
    """`model` less the keys `dropped`, every other key defined (defaults, bounds) once."""
    fields: dict[str, Any] = {n: (f.annotation, f) for n, f in model.model_fields.items() if n not in dropped}
    return create_model(name, __base__=Section, __module__=__name__, **fields)


# `learner.mini_batch_size` and `learner.epochs` cut a rollout batch: offline jobs use the
# top-level `batch_size` and `epochs`. `ray.placement`, `ray.gpus_per_rollout_worker` and
# `ray.rollout_resources` place rollout workers, which offline jobs do not have, and
# `learner.offload_optimizer` frees memory for them.
OfflineLearnerConfig = _without(
    LearnerConfig, "OfflineLearnerConfig", "mini_batch_size", "epochs", "offload_optimizer"
)
OfflineRayConfig = _without(
    RayConfig, "OfflineRayConfig", "placement", "gpus_per_rollout_worker", "rollout_resources"
)


class DataConfig(Section):
    path: str = Field(description=".jsonl, .parquet or a datasets.save_to_disk directory")
    split: str | None = Field(None, description="split of a DatasetDict directory; None: train")
    max_length: int | None = Field(
        None,
        gt=0,
        description="rows with more prompt + response tokens are skipped (never truncated); None: no limit",
    )
    strict: bool = Field(False, description="stop at the first bad row instead of skipping it")
    eval_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="held out for evaluation, chosen by the seed (at least one row when > 0)",
    )


class OfflineConfig(Section):
    name: str = "offline"
    seed: int = 0
    mode: Literal["ray", "inprocess"] = "ray"
    batch_size: int = Field(32, gt=0, description="pairs (dpo) or examples (sft) per optimizer step")
    epochs: int = Field(1, gt=0, description="passes over the training data (when steps is 0)")
    steps: int = Field(0, ge=0, description="optimizer steps; 0: as many as `epochs` take")
    eval_every: int = Field(0, ge=0, description="0: evaluate only before and after training")
    save_every: int = Field(0, ge=0, description="0: only a final checkpoint")
    save_keep_last: int | None = keep_last_field()
    save_keep_best: str | None = keep_best_field()
    save_keep_best_mode: BestMode | None = Field(None, description="best is the max (None) or the min")
    output_dir: str = "runs"
    resume: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    learner: OfflineLearnerConfig = Field(default_factory=OfflineLearnerConfig)
    ray: OfflineRayConfig = Field(default_factory=OfflineRayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    reweighting: ReweightingConfig = Field(default_factory=ReweightingConfig)

    @model_validator(mode="after")
    def _check(self) -> OfflineConfig:
        if self.mode == "inprocess" and self.learner.num_learners > 1:
            raise ValueError("mode 'inprocess' runs one learner; set learner.num_learners=1 or mode=ray")
        if problem := retention_problem(self):
            raise ValueError(problem)
        return self

    # the kind of algorithm the job runs, and the one it runs when `algorithm.name` is not set
    kind: ClassVar[type[Algorithm]]
    default_algorithm: ClassVar[str]
    # the chosen algorithm's Config with its `name` (`algorithm_section`)
    algorithm: SerializeAsAny[AlgoConfig] = Field(None, validate_default=True)

    @field_validator("algorithm", mode="before")
    @classmethod
    def _typed_algorithm(cls, value):
        return algorithm_section({} if value is None else value, cls.kind, cls.default_algorithm)

    # config.yaml holds the algorithm keys the config set, as `algorithm_spec` hands them
    # to the learners (tests/config/test_offline_config.py pins this form). Every default
    # would load again too: a dump leaves out the settings of unselected options.
    @field_serializer("algorithm", check_fields=False)
    def _set_keys_only(self, algorithm):
        return algorithm.model_dump(mode="json", exclude_unset=True)

    def algorithm_spec(self) -> tuple[str, dict]:
        """(name, params) of the loss, as the learners build it."""
        return self.algorithm.name, self.algorithm.model_dump(exclude_unset=True, exclude={"name"})


class SFTJobConfig(OfflineConfig):
    name: str = "sft"
    kind = TokenLoss
    default_algorithm = "sft"


class DPOJobConfig(OfflineConfig):
    name: str = "dpo"
    kind = PairLoss
    default_algorithm = "preference"


JOBS: dict[str, type[OfflineConfig]] = {"sft": SFTJobConfig, "dpo": DPOJobConfig}


def read_offline_config(job: str, path: str | os.PathLike | None, overrides: list[str] = ()) -> OfflineConfig:
    """The config of `rlpost <job>` (sft or dpo) from YAML and overrides, validated, its
    data path checked (`rlpost.jobs.preflight` checks the model)."""
    tree, source = read_config(path, overrides)
    data = tree.get("data")
    if not isinstance(data, dict) or data.get("path") is None:
        raise ConfigError(
            f"{source}: key 'data.path' is required: the dataset (.jsonl, .parquet "
            "or a datasets.save_to_disk directory)"
        )
    cfg = validate_config(JOBS[job], tree, source)
    if not Path(cfg.data.path).exists():
        raise ConfigError(f"{source}: key 'data.path': no such file or directory: {cfg.data.path}")
    return cfg
