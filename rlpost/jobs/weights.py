"""The controller's side of weight syncs: the transfer groups, one sync per update, the checks.

In the Ray mode the transfer groups (rlpost/engines/weight_sync.py) open when the job
starts. With separate placement, one group: the learners' rank 0 and every engine process,
the bytes broadcast (NCCL between GPUs, gloo between CPUs). Colocated, rollout worker r
shares learner r's device: a group of two per pair, bucket handles passed by IPC, all pairs
at once (each learner rank holds, or under ZeRO-3 gathers, the whole weights).
`rollout.weight_sync.transport` can choose either way. A sync runs the learners' sends and
the engines' receives at once, since they meet in the same collectives, and every engine
must report the version the learners sent. In the in-process mode the buckets are handed
from the learner to each engine in this process.

Two checks guard every rollout: each completion carries the version of the weights that
sampled it, which must be the one it was sent to be sampled with, the latest sync's unless
sent ahead (`check_rollouts`; streaming instead drops what lags too far), and the mean gap between
the engines' and the learners' log-probs of the same tokens must stay below
`rollout.weight_sync.max_logprob_gap` (`check_gap`), which catches weights that arrived
but were loaded wrong.
"""

from __future__ import annotations

from rlpost.config.rl import TrainConfig
from rlpost.engines.weight_sync import SyncPlan, WeightSyncError
from rlpost.workers.group import WorkerGroup, gather

GAP = "logprob_gap/rollout_vs_learner_mean"


class WeightSync:
    def __init__(self, cfg: TrainConfig, learners: WorkerGroup, rollout: WorkerGroup, use_ray: bool):
        self.wc = cfg.rollout.weight_sync
        self.learners, self.rollout, self.use_ray = learners, rollout, use_ray
        plan = learners.call("weight_plan", cfg.model.dtype, int(self.wc.bucket_mb * 2**20))[0]
        self.plan = SyncPlan.from_list(plan)
        self.version = 0  # learners and engines start from the same model
        self.steps = {0: 0}  # weight version -> the RL step after which it was sent
        if use_ray:
            transport = self.wc.transport
            self._open(plan, transport == "ipc" or (transport == "auto" and cfg.ray.placement == "colocated"))

    def _open(self, plan: list, ipc: bool) -> None:
        spots = self.learners.call("rendezvous")  # each rank's node address and a free port there
        timeout = self.wc.timeout_s
        if ipc:
            # rollout worker r shares learner r's device (tensor parallelism is 1 there):
            # a group of two each, all syncing at once
            engines = len(self.rollout)
            senders = [
                (*spot, 2, timeout, ipc) if r < engines else (None, 0, 0, timeout, ipc)
                for r, spot in enumerate(spots)
            ]
            receivers = [(plan, *spots[r], 1, 2, timeout, ipc) for r in range(engines)]
        else:
            # one group: the learners' rank 0, then each engine's processes
            ranks = self.rollout.call("weight_ranks")
            world = 1 + sum(ranks)
            senders = [(*spots[0], world, timeout, ipc)] + [(None, 0, 0, timeout, ipc)] * (len(spots) - 1)
            receivers = [
                (plan, *spots[0], 1 + sum(ranks[:r]), world, timeout, ipc) for r in range(len(ranks))
            ]
        gather(
            self.learners.submit("connect_weights", per_rank=senders)
            + self.rollout.submit("open_weights", per_rank=receivers)
        )

    def sync(self, step: int | None = None) -> int:
        """The learners' current weights (those after RL step `step`) into every engine;
        returns their version."""
        if self.use_ray:
            sends = self.learners.submit("send_weights")
            results = gather(sends + self.rollout.submit("receive_weights"))
            sent, received = results[0], results[len(sends) :]
            stale = [(rank, v) for rank, v in enumerate(received) if v != sent]
            if stale:
                raise WeightSyncError(
                    f"the learners sent weight version {sent}, but rollout worker(s) "
                    f"{', '.join(f'{r} loaded {v}' for r, v in stale)}"
                )
        else:
            learner = self.learners.workers[0]
            sent = learner.weight_version
            for worker in self.rollout.workers:
                buckets = ((self.plan.buckets[i], buf) for i, buf in learner.packed_buckets())
                worker.load_weights(sent, buckets)
        self.version = sent
        if step is not None:
            self.steps[sent] = step
        return sent

    def lag(self, step: int, version: int) -> int | None:
        """For a sample trained at `step`: the updates between weight `version`, which
        sampled it, and the learners' (those after step - 1); None: a version older than
        this process and its checkpoint know."""
        sent_after = self.steps.get(version)
        return None if sent_after is None else step - 1 - sent_after

    def recent_steps(self, count: int) -> dict[int, int]:
        """The latest `count` versions' steps (what a checkpoint keeps of `steps`)."""
        return dict(sorted(self.steps.items())[-count:])

    def check_rollouts(self, completions: list[list], version: int | None = None) -> None:
        """Every completion sampled with weight `version` (None: the latest sync's), else a
        WeightSyncError."""
        expected = self.version if version is None else version
        versions = {c.weight_version for group in completions for c in group}
        if versions - {expected}:
            raise WeightSyncError(
                f"rollouts came back sampled with weight version(s) {sorted(versions)}, but "
                f"they were sent to be sampled with version {expected} (the latest sync sent "
                f"{self.version}): an engine missed a sync, or loaded one too early"
            )

    def check_gap(self, metrics: dict[str, float], step: int) -> None:
        """Only where every sample trained on was sampled with the learners' weights (lag
        0): with rollout.staleness the gap also holds the updates since, which is no fault."""
        limit, gap = self.wc.max_logprob_gap, metrics.get(GAP)
        if metrics.get("staleness/lag_max", 0) > 0:
            return
        if limit is not None and gap is not None and gap > limit:
            raise WeightSyncError(
                f"step {step}: {GAP} is {gap:.4g} nats per token, over "
                f"rollout.weight_sync.max_logprob_gap={limit}: the engines sample from other "
                f"weights than the learners score (a sync that loaded wrong, or none)"
            )
