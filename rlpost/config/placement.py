"""Whether `ray`'s placement can hold a run's workers: checked when the config loads."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlpost.config.rl import TrainConfig


def placement_problem(cfg: TrainConfig) -> str | None:
    """Why cfg.ray's placement cannot hold the run's workers, or None."""
    rc, lc, ro = cfg.ray, cfg.learner, cfg.rollout
    tp = ro.vllm.tensor_parallel_size if ro.engine == "vllm" else 1
    if rc.placement == "separate":
        if ro.weight_sync.transport == "ipc":
            return (
                "rollout.weight_sync.transport=ipc hands each engine handles to the memory of "
                "the learner it shares a device with: set ray.placement=colocated"
            )
        if tp > 1 and rc.gpus_per_rollout_worker != tp:
            return (
                f"ray.gpus_per_rollout_worker ({rc.gpus_per_rollout_worker:g}) must equal "
                f"rollout.vllm.tensor_parallel_size ({tp}): a vLLM engine holds one GPU "
                f"per tensor-parallel rank"
            )
        return None
    if rc.gpus_per_learner not in (0, 1):
        return (
            f"ray.placement=colocated puts each learner rank on one GPU (or none): "
            f"ray.gpus_per_learner must be 0 or 1 (got {rc.gpus_per_learner:g})"
        )
    if rc.gpus_per_rollout_worker:
        return (
            "ray.gpus_per_rollout_worker is for ray.placement=separate; colocated rollout "
            "workers share the learners' GPUs (set it to 0)"
        )
    if rc.rollout_resources:
        return (
            "ray.rollout_resources is for ray.placement=separate; colocated rollout workers "
            "share the learners' bundles, which ray.learner_resources places"
        )
    if tp > 1:
        return (
            "ray.placement=colocated runs one vLLM engine per GPU: set "
            "rollout.vllm.tensor_parallel_size=1 or ray.placement=separate"
        )
    if ro.num_workers > lc.num_learners:
        return (
            f"ray.placement=colocated: rollout.num_workers ({ro.num_workers}) must not "
            f"exceed learner.num_learners ({lc.num_learners}); each rollout worker "
            f"shares the GPU of one learner rank"
        )
    return None
