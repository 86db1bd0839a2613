"""A group of identical workers: Ray actors in a placement group, or plain objects.

`call` runs a method on every worker (each with its own arguments or the same
ones) and returns the results in rank order. In the in-process mode the calls
run one after another in this process, so pdb steps straight into them.

`Placement` reserves the GPUs of a run's two roles, learners and rollout
workers, from `cfg.ray` (README "Clusters"):

- separate: one placement group per role, one bundle per worker, PACK strategy
  (a role fills as few nodes as it can). A bundle never spans nodes, so the
  tensor-parallel GPUs of one vLLM engine are always on one node.
- colocated: one placement group with one bundle per learner rank; learner r
  and rollout worker r each ask for half of its GPU, so both see the same GPU
  (how its memory is split is vLLM's `gpu_memory_utilization`).

A role's bundles also ask for its custom resources (`ray.learner_resources`,
`ray.rollout_resources`), which only the nodes started with them offer: that is
how a role is pinned to a kind of node.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from rlpost.config.rl import TrainConfig

Role = Literal["learner", "rollout", "critic", "prm"]


def free_port() -> int:
    """A port free on every interface of this node (other nodes may connect to it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Slots:
    """Where a role's workers go: worker r in bundle `bundles[r]` of `pg`, asking
    for `num_cpus` and `num_gpus` of it."""

    pg: Any
    bundles: list[int]
    num_cpus: float
    num_gpus: float


class Placement:
    """The placement groups of one run, made once (after Ray starts) and kept until
    `shutdown`, so the warm-up's learners and the RL learners take the same slots.
    In the in-process mode there is nothing to place: `slots` returns None."""

    def __init__(self, cfg: TrainConfig, use_ray: bool):
        self.groups: list[Any] = []
        self._slots: dict[str, Slots] = {}
        if not use_ray:
            return
        rc = cfg.ray
        learners, workers = cfg.learner.num_learners, cfg.rollout.num_workers
        # the critic / implicit PRM of the algorithm (rlpost/jobs/credit.py), each with
        # learners' ranks: in bundles of its own, or sharing the learners' (and their GPUs)
        extra = {role: section.placement for role, section in model_roles(cfg).items()}
        sharing = [role for role, where in extra.items() if where == "with_learners"]
        gpu = rc.gpus_per_learner
        if rc.placement == "colocated":
            share = gpu / (2 + len(sharing))
            # a CPU per worker, as in the separate placement (the local cluster has that many)
            pg = self._group(
                [
                    _bundle(1 + (rank < workers) + len(sharing), gpu, rc.learner_resources)
                    for rank in range(learners)
                ]
            )
            self._slots = {
                "learner": Slots(pg, list(range(learners)), 1, share),
                "rollout": Slots(pg, list(range(workers)), 1, share),
            }
        else:
            share = gpu / (1 + len(sharing))
            pg = self._group([_bundle(1 + len(sharing), gpu, rc.learner_resources)] * learners)
            self._slots["learner"] = Slots(pg, list(range(learners)), 1, share)
            self._slots["rollout"] = Slots(
                self._group([_bundle(1, rc.gpus_per_rollout_worker, rc.rollout_resources)] * workers),
                list(range(workers)),
                1,
                rc.gpus_per_rollout_worker,
            )
        learner_slots = self._slots["learner"]
        for role, where in extra.items():
            if where == "with_learners":
                self._slots[role] = Slots(learner_slots.pg, learner_slots.bundles, 1, learner_slots.num_gpus)
            else:
                self._slots[role] = Slots(
                    self._group([_bundle(1, gpu, rc.learner_resources)] * learners),
                    list(range(learners)),
                    1,
                    gpu,
                )

    def _group(self, bundles: list[dict]) -> Any:
        import ray
        from ray.util.placement_group import placement_group

        pg = placement_group(bundles, strategy="PACK")
        ray.get(pg.ready())
        self.groups.append(pg)
        return pg

    def slots(self, role: Role) -> Slots | None:
        return self._slots.get(role)

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups:
            remove_placement_group(pg)
        self.groups, self._slots = [], {}


def model_roles(cfg) -> dict[str, Any]:
    """The config sections of the models the algorithm trains beside the policy (a critic,
    an implicit PRM) by role name; none for configs without them (offline jobs)."""
    if not hasattr(cfg, "critic"):
        return {}
    needs = cfg.needs
    return {
        role: getattr(cfg, role)
        for role, used in (("critic", needs.values), ("prm", needs.implicit_prm))
        if used
    }


def gather(refs: list) -> list:
    """The results of Ray calls, in order. The first call that fails raises at once: the
    others may be waiting for it in a collective and would never return."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


def _bundle(cpus: float, gpus: float, custom: dict[str, float] | None = None) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **(custom or {})}


class WorkerGroup:
    """`slots` places the workers in a run's `Placement`; without it the group makes
    a placement group of its own (one bundle per worker, with the custom `resources`)
    and removes it at shutdown."""

    def __init__(
        self,
        cls: type,
        num_workers: int,
        make_kwargs: Callable[[int], dict],
        use_ray: bool,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        env: dict[str, str] | None = None,
        slots: Slots | None = None,
        resources: dict[str, float] | None = None,
    ):
        self.use_ray = use_ray
        self.workers: list[Any]
        self.pg = None
        if not use_ray:
            self.workers = [cls(**make_kwargs(rank)) for rank in range(num_workers)]
            return
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if slots is None:
            self.pg = placement_group([_bundle(num_cpus, num_gpus, resources)] * num_workers, strategy="PACK")
            ray.get(self.pg.ready())
            slots = Slots(self.pg, list(range(num_workers)), num_cpus, num_gpus)
        if len(slots.bundles) < num_workers:
            raise ValueError(f"{num_workers} {cls.__name__} workers but {len(slots.bundles)} slots")
        actor_cls = ray.remote(cls)
        self.workers = [
            actor_cls.options(
                num_cpus=slots.num_cpus,
                num_gpus=slots.num_gpus,
                runtime_env={"env_vars": env or {}},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=slots.pg, placement_group_bundle_index=slots.bundles[rank]
                ),
            ).remote(**make_kwargs(rank))
            for rank in range(num_workers)
        ]
        ray.get([w.ping.remote() for w in self.workers])

    def __len__(self) -> int:
        return len(self.workers)

    def call(self, method: str, *args, per_rank: list[tuple] | None = None, **kwargs) -> list:
        """Run `method` on all workers; `per_rank[i]` are worker i's positional args."""
        if not self.use_ray:
            arg_lists = per_rank if per_rank is not None else [args] * len(self.workers)
            return [getattr(w, method)(*a, **kwargs) for w, a in zip(self.workers, arg_lists)]
        return gather(self.submit(method, *args, per_rank=per_rank, **kwargs))

    def submit(self, method: str, *args, per_rank: list[tuple] | None = None, **kwargs) -> list:
        """`call` without waiting, in the Ray mode: the results' references, for calls that
        must run while another group's do (a collective that spans both groups)."""
        arg_lists = per_rank if per_rank is not None else [args] * len(self.workers)
        return [getattr(w, method).remote(*a, **kwargs) for w, a in zip(self.workers, arg_lists)]

    def shutdown(self) -> None:
        if self.use_ray:
            import ray
            from ray.util.placement_group import remove_placement_group

            try:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
            except Exception:  # a dead worker must not keep the others alive
                pass
            for w in self.workers:
                ray.kill(w)
            if self.pg is not None:  # a Placement's groups outlive the worker groups
                remove_placement_group(self.pg)
        else:
            for w in self.workers:
                w.shutdown()
        self.workers = []
