"""The config of `rlpost cdpo CONFIG`: an RL config plus a `cdpo` section.

The RL sections (model, task, reward, warm-up, rollout, learner, ray, tracking) serve the
sampling and the evaluation as they serve `rlpost train`. The two training stages are
`rlpost sft` and `rlpost dpo` jobs whose configs the pipeline writes: every key of theirs
can be set under `cdpo.contrast` (the positive and negative models) and `cdpo.dpo` (the
weighted DPO stage, and the plain-DPO baseline), over defaults from docs/algorithms.md.
They inherit `seed`, `mode`, `ray`, `tracking` and the `learner` section; `model` and
`data` are the pipeline's to set.

Every stage's config is built and validated when the file is loaded, before anything starts.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from rlpost.algorithms import ALGORITHMS
from rlpost.algorithms.base import PolicyGradient
from rlpost.config.load import check_names, read_config, validate_config
from rlpost.config.offline import JOBS, OfflineConfig, OfflineLearnerConfig, OfflineRayConfig
from rlpost.config.rl import TrainConfig
from rlpost.config.sections import Section, algorithm_section

# docs/algorithms.md, cDPO step 2: LoRA r = 8 on the MLP projections, lr 3e-4, 1 epoch.
CONTRAST_DEFAULTS = {"epochs": 1, "batch_size": 32, "learner": {"lr": 3e-4, "lora": {"r": 8}}}
# step 4: token-weighted DPO, beta = 0.1 (the learning rate is the `learner` section's)
DPO_DEFAULTS = {"epochs": 1, "batch_size": 32, "algorithm": {"loss": "cdpo", "beta": 0.1}}
SET_BY_PIPELINE = ("name", "seed", "mode", "model", "output_dir", "resume", "ray", "tracking")
# the stages that run `rlpost sft` / `rlpost dpo`, and the section each reads
TRAINING_STAGES = {
    "positive": ("sft", "contrast"),
    "negative": ("sft", "contrast"),
    "dpo": ("dpo", "dpo"),
    "baseline": ("dpo", "dpo"),
}


class CDPOSection(Section):
    problems: int = Field(
        512,
        gt=0,
        description="training problems whose trajectories are "
        "sampled: the first of the task's seeded training set",
    )
    pairs_per_problem: int = Field(
        4,
        gt=0,
        description="at most this many (correct, incorrect) "
        "pairs per problem, one per distinct incorrect trajectory",
    )
    gamma: float = Field(1.0, ge=0, description="z = (1 + gamma) z_pos - gamma z_neg")
    contrast: dict[str, Any] = Field(
        default_factory=dict,
        description="`rlpost sft` keys of the positive and negative models, over CONTRAST_DEFAULTS",
    )
    dpo: dict[str, Any] = Field(
        default_factory=dict,
        description="`rlpost dpo` keys of the weighted DPO stage (and of the baseline), over DPO_DEFAULTS",
    )
    baseline: bool = Field(
        True,
        description="also train plain DPO on the same pairs from the "
        "same start (loss dpo, every other key DPO takes the same) and evaluate it",
    )
    view_pairs: int = Field(6, ge=0, description="pairs shown in the token-weight view")


class CDPOConfig(TrainConfig):
    name: str = "cdpo"
    cdpo: CDPOSection = Field(default_factory=CDPOSection)

    @model_validator(mode="before")
    @classmethod
    def _no_algorithm(cls, data: Any) -> Any:
        # before the section is typed: an RL algorithm, even an unknown one, is refused here
        if isinstance(data, dict) and not _default_algorithm(data.get("algorithm", {})):
            raise ValueError(
                "key 'algorithm' is for rlpost train; the DPO stage's loss is set under cdpo.dpo.algorithm"
            )
        return data

    @model_validator(mode="after")
    def _check_batch_shape(self) -> CDPOConfig:
        return self  # replaces TrainConfig's: there are no RL mini-batches to cut

    @model_validator(mode="after")
    def _no_rl_keys(self) -> CDPOConfig:
        if self.from_files:
            raise ValueError(
                "data.train_files: rlpost cdpo samples from a task's problems (task.name); "
                "prompts from files are for rlpost train and rlpost eval"
            )
        # RL-only keys would be silently ignored: refuse any that differs from its default
        for key in ("steps", "eval_every", "save_every", "save_keep_last", "save_keep_best"):
            if getattr(self, key) != TrainConfig.model_fields[key].default:
                raise ValueError(
                    f"key '{key}' is for rlpost train; rlpost cdpo's training "
                    f"stages are set under cdpo.contrast and cdpo.dpo"
                )
        if self.reweighting.scheme != "none":
            raise ValueError(
                "key 'reweighting.scheme' is for rlpost train; rlpost cdpo's training stages "
                "take it under cdpo.contrast.reweighting and cdpo.dpo.reweighting"
            )
        if self.cdpo.problems > self.task.train_size:
            raise ValueError(
                f"key 'cdpo.problems': {self.cdpo.problems} is more than the task's "
                f"training problems (task.train_size = {self.task.train_size})"
            )
        for section in ("contrast", "dpo"):
            for key in SET_BY_PIPELINE:
                if key in getattr(self.cdpo, section):
                    raise ValueError(
                        f"key 'cdpo.{section}.{key}' is set by the pipeline "
                        f"(from the top-level keys and the stages' outputs)"
                    )
            if "path" in getattr(self.cdpo, section).get("data", {}):
                raise ValueError(f"key 'cdpo.{section}.data.path' is set by the pipeline")
        return self


def _default_algorithm(value: Any) -> bool:
    try:
        return algorithm_section(value, PolicyGradient) == algorithm_section({}, PolicyGradient)
    except ValueError:  # ConfigError and ValidationError
        return False


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_config(
    cfg: CDPOConfig, stage: str, model: str | Path, data: str | Path, source: str = "config"
) -> OfflineConfig:
    """The `rlpost sft` / `rlpost dpo` config of a training stage, training `model` on
    `data`; errors name the section they come from."""
    job, section = TRAINING_STAGES[stage]
    inherited = {"learner": (cfg.learner, OfflineLearnerConfig), "ray": (cfg.ray, OfflineRayConfig)}
    tree = {
        key: {k: v for k, v in value.model_dump(mode="json").items() if k in schema.model_fields}
        for key, (value, schema) in inherited.items()
    }
    tracking = cfg.tracking.model_dump(mode="json")
    tracking.update(
        group=cfg.tracking.group or cfg.name, run_name=f"{cfg.tracking.run_name or cfg.name}/{stage}"
    )
    tree.update(
        name=f"{cfg.name}-{stage}",
        seed=cfg.seed,
        mode=cfg.mode,
        tracking=tracking,
        model={"kind": "hf", "path": str(model), "dtype": cfg.model.dtype},
        data={"path": str(data)},
    )
    tree = _merge(
        _merge(tree, CONTRAST_DEFAULTS if job == "sft" else DPO_DEFAULTS), getattr(cfg.cdpo, section)
    )
    if stage == "baseline":  # plain DPO: the keys of the stage's own loss (treg_alpha, ...) do not apply
        ignored = ALGORITHMS["preference"].Config(loss="dpo").ignored_keys()
        tree["algorithm"] = {k: v for k, v in tree["algorithm"].items() if k not in ignored} | {"loss": "dpo"}
    return validate_config(JOBS[job], tree, f"{source}: section 'cdpo.{section}'")


def read_cdpo_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> CDPOConfig:
    """The pipeline's config, with every stage's config validated (on stand-in paths)."""
    tree, source = read_config(path, overrides)
    cfg = validate_config(CDPOConfig, tree, source)
    check_names(cfg, source)
    for stage in TRAINING_STAGES:
        if stage != "baseline" or cfg.cdpo.baseline:
            stage_config(cfg, stage, "<start model>", "<stage data>", source)
    return cfg
