"""The learners' side of loss-based sample reweighting (docs/algorithms.md section 8).

The weights of an optimizer step need the loss of every sample of it, on every rank, before
any backward pass: a learner first scores its micro-batches without gradient, then
`StepReweighting.multipliers` gathers the step's losses from all ranks (a few numbers per
sample), and the training pass multiplies each sample's share of the loss by its N w_i.
"""

from __future__ import annotations

import torch

from rlpost.algorithms import reweight_metrics, sample_multipliers
from rlpost.algorithms.base import PolicyGradient
from rlpost.config.rl import TrainConfig
from rlpost.tracking.metrics import MetricSums


def gather_losses(losses: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, slice]:
    """Every rank's `losses` (1-D, any length, also 0), rank after rank, and where this
    rank's are among them."""
    if world_size == 1:
        return losses, slice(0, len(losses))
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.long, device=losses.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(losses)], device=losses.device))
    sizes = [int(n) for n in sizes]
    padded = torch.zeros(max(sizes), dtype=losses.dtype, device=losses.device)
    padded[: len(losses)] = losses
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    start = sum(sizes[:rank])
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), slice(start, start + len(losses))


class StepReweighting:
    """A learner's `reweighting:` section (scheme not 'none') and its place among the ranks."""

    def __init__(self, section, rank: int, world_size: int, device: torch.device):
        self.scheme, self.temperature = section.scheme, section.temperature
        self.burn_in_steps = section.burn_in_steps
        self.rank, self.world_size, self.device = rank, world_size, device

    @classmethod
    def of(cls, cfg, algorithm, rank: int, world_size: int, device: torch.device) -> StepReweighting | None:
        """The settings in `cfg` (a job's config) for a learner of `algorithm`; None when the
        scheme is 'none', and in `rlpost train` for a learner not running a policy gradient
        (the SFT warm-up, the implicit PRM), which gets the same config."""
        section = getattr(cfg, "reweighting", None)
        if section is None or section.scheme == "none":
            return None
        if isinstance(cfg, TrainConfig) and not isinstance(algorithm, PolicyGradient):
            return None
        return cls(section, rank, world_size, device)

    def active(self, optimizer_steps: int) -> bool:
        """Whether the step after `optimizer_steps` steps is reweighted (burn-in over)."""
        return optimizer_steps >= self.burn_in_steps

    def multipliers(self, losses: torch.Tensor, metrics: MetricSums) -> torch.Tensor:
        """N w_i of this rank's samples of the step, from their `losses` (every rank calls
        it, with its own), and the step's `reweight/*` metrics (the same on every rank)."""
        everyone, mine = gather_losses(losses.detach().double(), self.rank, self.world_size)
        if len(everyone) == 0:  # nothing weighted in the whole step
            return torch.ones_like(losses, dtype=torch.float64)
        weights = sample_multipliers(everyone, self.scheme, self.temperature)
        metrics.add_tokens("reweight/weight_max", weights)
        metrics.add_tokens("reweight/weight_min", weights)
        for name, value in reweight_metrics(everyone, weights).items():
            metrics.add_mean(name, value)
        return weights[mine]

    def token_scales(
        self, scored: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]], metrics: MetricSums
    ) -> list[torch.Tensor]:
        """Token losses: per micro-batch scored, given as (token losses, aggregation weights,
        seq_index, number of samples), each sample's N w_i from l_i = sum_t weight_t loss_t /
        sum_t weight_t, its loss under the mini-batch's own aggregation (the mean token loss
        under token-mean). A sample without a weighted token is not one of the N and keeps 1
        (its tokens weigh nothing)."""
        sums, totals = [], []
        for token_loss, weights, seq_index, count in scored:
            zeros = torch.zeros(count, dtype=torch.float64, device=token_loss.device)
            sums.append(zeros.index_add(0, seq_index, weights * token_loss))
            totals.append(zeros.index_add(0, seq_index, weights))
        empty = torch.zeros(0, dtype=torch.float64, device=self.device)  # a rank given no samples
        loss_sum, weight = (torch.cat(sums), torch.cat(totals)) if sums else (empty, empty)
        metrics.add_total("reweight/unweighted_loss", loss_sum.sum())
        counted = weight != 0
        scales = torch.ones_like(weight)
        scales[counted] = self.multipliers(loss_sum[counted] / weight[counted], metrics)
        return list(scales.split([len(s) for s in sums]))
