"""Where an RL step's time went: the workers' compute, how busy each was, the framework's share."""

from __future__ import annotations


def time_metrics(
    metrics: dict[str, float], workers: dict[str, list[dict]], staleness: int
) -> dict[str, float]:
    """The workers' compute seconds in an RL step (`workers`: each role's workers' seconds
    per kind of compute), the fraction of the step each worker was busy, and, when the
    step's phases run one after another (staleness 0), the framework overhead: what the
    step's wall time spent beyond that compute, the reward phase and the weight sync (none
    when dynamic sampling dropped every group)."""
    step = metrics["time/step"]
    out = {
        f"time/compute/{name}": max((w.get(name, 0.0) for ws in workers.values() for w in ws), default=0.0)
        for name in ("generate", "logprob", "update")
    }
    for role, per_worker in workers.items():
        for rank, seconds in enumerate(per_worker):
            out[f"time/busy/{role}_{rank}"] = sum(seconds.values()) / step
    if staleness == 0:  # else generation overlaps the other phases
        compute = sum(out[f"time/compute/{n}"] for n in ("generate", "logprob", "update"))
        # credit beyond the outcome (critic, PRM, continuations: rlpost/jobs/credit.py) is timed
        # on the controller, not in the policy's workers' clocks
        phases = ("reward", "weight_sync", "credit", "critic_update")
        outside = sum(metrics.get(f"time/{k}", 0.0) for k in phases)
        overhead = step - compute - outside
        out.update({"time/framework_overhead": overhead, "time/framework_overhead_frac": overhead / step})
    return out
