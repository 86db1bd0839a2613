"""Engines and learners that share GPUs take turns with the memory in an RL step.

With `rollout.vllm.sleep_level` > 0 the vLLM engines sleep from the end of generation to the
weight sync, and with `learner.offload_optimizer` the learners' optimizer state sits in CPU
memory from the end of one update to the start of the next. One step, as `Trainer.rl_step`
calls the hooks:

    generate                                    engines awake, optimizer state offloaded
    before_update: sleep(level), reload_optimizer
    old log-probs and the update                the learners compute the log-probs
    after_update:  offload_optimizer, wake_up(["weights"])
    the weight sync                             into the woken weight memory
    after_sync:    wake_up(["kv_cache"])        engines fully awake again; time/colocation

The weights wake first so that the sync has somewhere to load into while the KV cache
still leaves the GPU's memory to the learners; it comes back only once the new weights are
in. Outside the window engines are always awake, so evaluation and the sync after a resume
(which run between steps) need nothing from here. With neither switch on, every hook does
nothing. A hook that raises leaves the job to end: nothing here retries or restores.
"""

from __future__ import annotations

import time

from rlpost.config.rl import TrainConfig


class Colocation:
    """One RL step's hooks around its update and weight sync. `learners` and `rollout`
    are the job's worker groups (anything with `call(method, *args)`); `seconds` is the
    time the hooks took."""

    def __init__(self, cfg: TrainConfig, learners, rollout):
        self.level = cfg.rollout.vllm.sleep_level if cfg.rollout.engine == "vllm" else 0
        self.offload = cfg.learner.offload_optimizer
        self.learners, self.rollout = learners, rollout
        self.asleep = False
        self.seconds = 0.0

    @property
    def active(self) -> bool:
        return bool(self.level or self.offload)

    def before_update(self) -> None:
        """Engines sleep (the log-probs and the update need no engine); learners take
        their optimizer state back (DeepSpeed moves nothing the first time)."""
        t = time.perf_counter()
        if self.level:
            self.rollout.call("sleep", self.level)
            self.asleep = True
        if self.offload:
            self.learners.call("reload_optimizer")
        self.seconds += time.perf_counter() - t

    def after_update(self) -> None:
        """The optimizer state leaves before the engines take memory back; the engines'
        weight memory returns for the sync."""
        t = time.perf_counter()
        if self.offload:
            self.learners.call("offload_optimizer")
        if self.asleep:
            self.rollout.call("wake_up", ["weights"])
        self.seconds += time.perf_counter() - t

    def after_sync(self, times: dict[str, float]) -> None:
        """The KV cache returns: the engines can generate again. With a switch on, the
        hooks' seconds go into the step's `times` as "colocation"."""
        if self.asleep:
            t = time.perf_counter()
            awake = self.rollout.call("wake_up", ["kv_cache"])
            self.asleep = False
            self.seconds += time.perf_counter() - t
            if not all(awake):
                # vLLM schedules nothing until every allocation is back: the next generate would hang
                raise RuntimeError(f"vLLM engines still asleep after wake_up(['kv_cache']): {awake}")
        if self.active:
            times["colocation"] = self.seconds
