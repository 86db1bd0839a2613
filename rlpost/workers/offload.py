"""`learner.offload_optimizer`: a learner's DeepSpeed optimizer state out of accelerator
memory between updates (DeepSpeed's `offload_states` / `reload_states`), so that the vLLM
engine sharing its GPU has the room while it generates (rlpost/jobs/colocation.py).

Moved: Adam's moments (`optim_states`) and the fp32 master weights (`hp_params`), 12 bytes
per trained parameter over the ranks, nothing the learner reads between updates. Not the
model's own weights (`lp_params`): the log-prob pass and the weight sync read them before
the next update. ZeRO-1/2 only (rlpost/config/colocation.py says why). DeepSpeed keeps
track of what it moved, so a reload with nothing offloaded (the first update) moves
nothing. On a CPU learner the accelerator's memory is host memory: the state stays where it
is, while DeepSpeed still unlinks and relinks the master weights, which is what the CPU
tests exercise.
"""

from __future__ import annotations


def offload_optimizer_state(engine) -> None:
    """`engine`'s (a DeepSpeedEngine's) optimizer state to pinned CPU memory."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum, OffloadStateTypeEnum

    engine.offload_states(
        include=[OffloadStateTypeEnum.optim_states, OffloadStateTypeEnum.hp_params],
        device=OffloadDeviceEnum.cpu,
        # pinned: the copy back before the next update runs at full bandwidth
        pin_memory=True,
        non_blocking=False,
    )


def reload_optimizer_state(engine) -> None:
    """What `offload_optimizer_state` moved, back on `engine`'s device."""
    engine.reload_states(non_blocking=False)
