"""Whether the colocation switches (`rollout.vllm.sleep_level`, `learner.offload_optimizer`)
fit the rest of a run's config: checked when the config loads. Whether vLLM's sleep mode
exists on this machine needs vLLM imported: rlpost/jobs/preflight.py asks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlpost.errors import ConfigError

if TYPE_CHECKING:
    from rlpost.config.rl import TrainConfig

# DeepSpeed 0.19.8's `offload_states` lives on its ZeRO optimizers only (stage 0 trains with
# the plain torch optimizer), and at stage 3 moves Adam's state only for DeepSpeed's own
# FusedAdam, while the learners train with torch's AdamW (rlpost/workers/policy_rank.py).
OFFLOAD_STAGES = (1, 2)


def check_colocation(cfg: TrainConfig) -> None:
    """A ConfigError naming the key when cfg's sleep level or optimizer offload cannot work
    as configured."""
    level, offload = cfg.rollout.vllm.sleep_level, cfg.learner.offload_optimizer
    if level and cfg.rollout.engine != "vllm":
        raise ConfigError(
            f"key 'rollout.vllm.sleep_level': {level} needs rollout.engine=vllm (the transformers "
            f"engine has no sleep mode); set it to 0"
        )
    # both free GPU memory for the other side of a shared GPU: on GPUs of their own the
    # memory would sit idle while the swaps cost time every step. In-process, the learner
    # and the engine share the process's GPU.
    shared = cfg.mode == "inprocess" or cfg.ray.placement == "colocated"
    for key, on in (("rollout.vllm.sleep_level", level), ("learner.offload_optimizer", offload)):
        if on and not shared:
            raise ConfigError(
                f"key '{key}': frees GPU memory for the engine or learner that shares the GPU, "
                f"so it needs ray.placement=colocated (or mode=inprocess); turn it off with "
                f"ray.placement=separate"
            )
    if offload and cfg.learner.zero_stage not in OFFLOAD_STAGES:
        raise ConfigError(
            f"key 'learner.offload_optimizer': needs learner.zero_stage 1 or 2 (got "
            f"{cfg.learner.zero_stage}): DeepSpeed offloads state only from its ZeRO optimizers, "
            f"and at stage 3 only for its own FusedAdam, not the learners' torch AdamW"
        )
