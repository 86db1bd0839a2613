"""A group of identical workers: Ray actors in a placement group, or plain objects.

`call` runs a method on every worker (each with its own arguments or the same
ones) and returns the results in rank order. In the in-process mode the calls
run one after another in this process, so pdb steps straight into them.
"""
from __future__ import annotations

import socket
from typing import Any, Callable


def free_port() -> int:
    """A port free on every interface of this node (other nodes may connect to it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class WorkerGroup:
    def __init__(self, cls: type, num_workers: int, make_kwargs: Callable[[int], dict],
                 use_ray: bool, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 env: dict[str, str] | None = None):
        self.use_ray = use_ray
        self.workers: list[Any]
        if not use_ray:
            self.workers = [cls(**make_kwargs(rank)) for rank in range(num_workers)]
            return
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.pg = placement_group([bundle] * num_workers, strategy="PACK")
        ray.get(self.pg.ready())
        actor_cls = ray.remote(cls)
        self.workers = [
            actor_cls.options(
                num_cpus=num_cpus, num_gpus=num_gpus,
                runtime_env={"env_vars": env or {}},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank),
            ).remote(**make_kwargs(rank))
            for rank in range(num_workers)
        ]
        ray.get([w.ping.remote() for w in self.workers])

    def __len__(self) -> int:
        return len(self.workers)

    def call(self, method: str, *args, per_rank: list[tuple] | None = None, **kwargs) -> list:
        """Run `method` on all workers; `per_rank[i]` are worker i's positional args."""
        arg_lists = per_rank if per_rank is not None else [args] * len(self.workers)
        if not self.use_ray:
            return [getattr(w, method)(*a, **kwargs) for w, a in zip(self.workers, arg_lists)]
        import ray

        return ray.get([getattr(w, method).remote(*a, **kwargs)
                        for w, a in zip(self.workers, arg_lists)])

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
            remove_placement_group(self.pg)
        else:
            for w in self.workers:
                w.shutdown()
        self.workers = []
