"""What every config section is: a pydantic model that forbids unknown keys.

Also the keys of checkpoint retention every job's config has (save_keep_*)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def keep_last_field():
    return Field(
        None,
        gt=0,
        description="keep the last N complete checkpoints, deleting older ones once a newer "
        "one is on disk (rlpost/jobs/run_dir.py); None: keep every one",
    )


def keep_best_field():
    return Field(
        None,
        min_length=1,
        description="also keep the checkpoint with the best value of this metric (e.g. "
        "eval/accuracy_greedy) among those saved at a step that logged it; needs save_keep_last",
    )


# None (the default, "max"), not "max": a config.yaml written before the key existed, which
# lacks it, must compare equal to one written since (a sweep resumes only unchanged runs)
BestMode = Literal["max", "min"]


def retention_problem(cfg) -> str | None:
    """What is wrong with a config's save_keep_* keys (None: nothing)."""
    if cfg.save_keep_best is not None and cfg.save_keep_last is None:
        return (
            "save_keep_best keeps the best checkpoint besides the last save_keep_last ones, "
            "and with save_keep_last unset every checkpoint is kept; set save_keep_last"
        )
    return None
