"""HAPO's token-level pieces as pure tensor functions (docs/algorithms.md section 1, "HAPO").

"From Uniform to Heterogeneous: Tailoring Policy Optimization to Every Token's
Nature". All four parts are keyed to a normalised log-entropy h_hat in [-1, 1]:

1. `entropy_stats` / `normalised_log_entropy`: e_t = log max(H_t, 1e-8), pivot
   p = q-quantile of e over the valid tokens, s = sqrt(mean (e - p)^2),
   h = (e - p) / s, h_hat = h / max(h+) for h > 0 and h_hat = -h / min(h-) for
   h <= 0. This is the *intended* sign (lowest-entropy token -> -1, highest ->
   +1); the released code divides the negative side by min(h-) without the
   minus sign, which flips low-entropy tokens to positive values.
2. `adaptive_temperature`: T_t = T * (1 + tau * h_hat_t), with the statistics
   of the *previous* rollout batch (the caller uses plain T on the first step).
3. `adaptive_clip_bounds`: eps_low_t widened for low-entropy tokens, eps_high_t
   widened for high-entropy tokens.
4. `redistribute_advantages`: A~ = A (1 + beta h_hat) inside / outside a
   neutral zone of the ratio, chosen by the sign of h_hat (no gradient).

`hapo_token_loss` puts 3 and 4 into the PPO clipped surrogate with dual clip,
and the `HAPO` algorithm (`algorithm.name: hapo`) trains with it: h_hat comes
from the old policy's entropies over the whole rollout batch. For part 2 it hands
the runtime a `TemperatureRule` (`sampling_rule`) built from each rollout batch's
entropies; the rollout engines apply it to the next batch per token, and the
learners score those tokens at the same per-token temperature.
Every part can be switched off for ablation (tau = 0, adaptive_clip=False,
redistribute=False or beta = 0, alpha = 0, dual_clip=None).

Degenerate cases (decisions, not from the paper):
- no valid token: neutral statistics (p = 0, s = 0, max_pos = 1, min_neg = -1),
  so every h_hat is 0;
- s == 0 (all valid entropies equal after the 1e-8 floor): h is defined as 0
  everywhere, so h_hat == 0 (plain temperature, base clip, A unchanged);
- no token with h > 0 (e.g. q = 1): max_pos = 1;
- no token with h < 0, i.e. min(h-) == 0 (e.g. q = 0, or ties at the bottom):
  min_neg = -1. Every h <= 0 of that batch is 0 and so maps to 0 either way;
  the value only matters for entropies of another batch, where it gives
  h_hat = h before clamping.
Because the statistics may come from another batch (the adaptive temperature
uses the previous rollout batch's), h_hat is clamped to [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from pydantic import Field

from rlpost.algorithms.advantages import AdvantageName
from rlpost.algorithms.base import TokenTensors
from rlpost.algorithms.grpo import GRPO, GRPOConfig, clipped_surrogate
from rlpost.algorithms.selection import quantile_linear

ENTROPY_FLOOR = 1e-8


@dataclass(frozen=True)
class EntropyStats:
    """Normalisation statistics of the log-entropy over one batch of valid tokens."""

    p: float  # pivot: q-quantile of e = log max(H, 1e-8)
    s: float  # sqrt(mean((e - p)^2)); 0 means "degenerate: h = 0 everywhere"
    max_pos: float  # max of h over h > 0 (1 if there is none)
    min_neg: float  # min of h over h <= 0 (-1 if there is none or it is 0)

    @classmethod
    def neutral(cls) -> EntropyStats:
        """Statistics under which every token has h_hat = 0."""
        return cls(p=0.0, s=0.0, max_pos=1.0, min_neg=-1.0)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _log_entropy(entropy: torch.Tensor) -> torch.Tensor:
    x = entropy.detach()
    return x.to(_work_dtype(x)).clamp(min=ENTROPY_FLOOR).log()


def _standardise(e: torch.Tensor, p: float, s: float) -> torch.Tensor:
    """h = (e - p) / s, or 0 everywhere when s == 0. Shared by `entropy_stats` and
    `normalised_log_entropy` so both compute bit-identical h (which is what makes
    h_hat exactly +-1 at the extreme tokens of the batch the stats come from)."""
    if s == 0.0:
        return torch.zeros_like(e)
    return (e - p) / s


def entropy_stats(entropy: torch.Tensor, mask: torch.Tensor | None = None, q: float = 0.8) -> EntropyStats:
    """Statistics of e = log max(H, 1e-8) over the valid tokens (mask true / nonzero;
    all tokens if mask is None). See the module docstring for the degenerate cases."""
    e = _log_entropy(entropy).reshape(-1)
    if mask is not None:
        e = e[mask.reshape(-1).bool()]
    if e.numel() == 0:
        return EntropyStats.neutral()
    p = quantile_linear(e, q).item()
    s = (e - p).square().mean().sqrt().item()
    h = _standardise(e, p, s)
    pos, neg = h[h > 0], h[h <= 0]
    max_pos = pos.max().item() if pos.numel() else 1.0
    min_neg = neg.min().item() if neg.numel() else -1.0
    if min_neg == 0.0:
        min_neg = -1.0
    return EntropyStats(p=p, s=s, max_pos=max_pos, min_neg=min_neg)


def normalised_log_entropy(entropy: torch.Tensor, stats: EntropyStats) -> torch.Tensor:
    """h_hat in [-1, 1] (no gradient): h / max_pos for h > 0, -h / min_neg for h <= 0.
    The lowest-entropy valid token of the batch `stats` came from gets exactly -1 and
    the highest exactly +1; entropies of other batches are clamped to [-1, 1]."""
    h = _standardise(_log_entropy(entropy), stats.p, stats.s)
    h_hat = torch.where(h > 0, h / stats.max_pos, -h / stats.min_neg)
    return h_hat.clamp(-1.0, 1.0)


def adaptive_temperature(
    base_T: float | torch.Tensor, h_hat: torch.Tensor, tau: float = 0.05
) -> torch.Tensor:
    """Per-token sampling temperature T_t = T * (1 + tau * h_hat_t); tau = 0 gives plain T."""
    return base_T * (1.0 + tau * h_hat)


@dataclass(frozen=True)
class TemperatureRule:
    """HAPO's adaptive temperature for one rollout batch: T_t = T (1 + tau h_hat_t), with
    h_hat_t from the entropy at the base temperature T of the distribution the token is
    drawn from, normalised by `stats` of the previous batch. One function serves both
    rollout engines and the learners, so all three derive the same T_t. A `SamplingRule`."""

    stats: EntropyStats
    tau: float

    def factor(self, entropy: torch.Tensor) -> torch.Tensor:
        """T_t / T from the entropies at the base temperature."""
        return adaptive_temperature(1.0, normalised_log_entropy(entropy, self.stats), self.tau)

    def apply(self, scaled_logits: torch.Tensor) -> torch.Tensor:
        """Logits already divided by the base temperature ([rows, vocab]) -> divided by
        T_t instead; in place where possible. Rows of -inf entries (masked tokens) are fine."""
        log_p = scaled_logits.float().log_softmax(-1)
        p = log_p.exp()
        entropy = -(p * log_p.nan_to_num(neginf=0.0)).sum(-1)
        return scaled_logits.div_(self.factor(entropy).to(scaled_logits.dtype)[:, None])

    def to_dict(self) -> dict:
        return {
            "rule": f"{type(self).__module__}:{type(self).__qualname__}",
            "stats": asdict(self.stats),
            "tau": self.tau,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TemperatureRule:
        return cls(EntropyStats(**d["stats"]), d["tau"])


def adaptive_clip_bounds(
    h_hat: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (eps_low_t, eps_high_t):
    eps_low_t = eps_low (1 - alpha h_hat) if h_hat <= 0 else eps_low;
    eps_high_t = eps_high (1 + alpha h_hat) if h_hat > 0 else eps_high."""
    h = h_hat.detach()
    base_low = torch.full_like(h, eps_low)
    base_high = torch.full_like(h, eps_high)
    eps_low_t = torch.where(h <= 0, eps_low * (1.0 - alpha * h), base_low)
    eps_high_t = torch.where(h > 0, eps_high * (1.0 + alpha * h), base_high)
    return eps_low_t, eps_high_t


def neutral_zone(
    ratio: torch.Tensor, eps_low_t: torch.Tensor | float, eps_high_t: torch.Tensor | float
) -> torch.Tensor:
    """Boolean N_t = {1 - eps_low_t / 2 < rho_t < 1 + eps_high_t / 2} (strict bounds)."""
    r = ratio.detach()
    return (r > 1.0 - eps_low_t / 2) & (r < 1.0 + eps_high_t / 2)


@torch.no_grad()
def redistribute_advantages(
    adv: torch.Tensor,
    ratio: torch.Tensor,
    h_hat: torch.Tensor,
    eps_low_t: torch.Tensor | float,
    eps_high_t: torch.Tensor | float,
    beta: float = 1.0,
) -> torch.Tensor:
    """Differential advantage redistribution, without gradient. A~ = A (1 + beta h_hat);
    high-entropy tokens (h_hat > 0) keep A inside the neutral zone and take A~ outside
    it; low-entropy tokens (h_hat <= 0) take A~ inside and keep A outside."""
    inside = neutral_zone(ratio, eps_low_t, eps_high_t)
    h = h_hat.detach()
    a = adv.detach()
    use_tilde = torch.where(h > 0, ~inside, inside)
    return torch.where(use_tilde, a * (1.0 + beta * h), a)


def hapo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    h_hat: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    alpha: float = 1.0,
    beta: float = 1.0,
    dual_clip: float | None = 10.0,
    adaptive_clip: bool = True,
    redistribute: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token HAPO loss [T] and per-token metric tensors.

    Per-token clip bounds (adaptive, or the base ones), advantages redistributed (or
    not), then GRPO's clipped surrogate with dual clip (None: off). A here is the
    advantage actually used (redistributed when `redistribute`), also for the clip
    fractions and the dual clip. h_hat carries no gradient.
    """
    h = h_hat.detach()
    log_ratio = logp - old_logp
    if adaptive_clip:
        eps_low_t, eps_high_t = adaptive_clip_bounds(h, eps_low, eps_high, alpha)
    else:
        eps_low_t = torch.full_like(h, eps_low)
        eps_high_t = torch.full_like(h, eps_high)
    ratio = log_ratio.detach().exp()
    a = redistribute_advantages(adv, ratio, h, eps_low_t, eps_high_t, beta) if redistribute else adv.detach()
    loss, metrics = clipped_surrogate(log_ratio, a, eps_low_t, eps_high_t, dual_clip)
    metrics["h_hat"] = h
    metrics["neutral_frac"] = neutral_zone(ratio, eps_low_t, eps_high_t).float()
    return loss, metrics


class HAPOConfig(GRPOConfig):
    """HAPO recipe defaults: token-level group-average advantages, dual clip 10."""

    advantage: AdvantageName = "hapo"
    dual_clip: float | None = Field(10.0, gt=1)
    tau: float = Field(0.05, ge=0, description="adaptive temperature strength; 0: plain T")
    entropy_quantile: float = Field(0.8, ge=0, le=1, description="q of the pivot")
    alpha: float = Field(1.0, ge=0, description="adaptive clip strength")
    beta: float = Field(1.0, ge=0, description="advantage redistribution strength")
    adaptive_clip: bool = True
    redistribute: bool = True


class HAPO(GRPO):
    name = "hapo"
    Config = HAPOConfig

    def __init__(self, cfg: HAPOConfig):
        super().__init__(cfg)
        self.needs = replace(self.needs, old_policy_entropy=True)  # h_hat comes from them

    def token_inputs(self, entropy: torch.Tensor) -> dict[str, torch.Tensor]:
        stats = entropy_stats(entropy, q=self.cfg.entropy_quantile)
        return {"h_hat": normalised_log_entropy(entropy, stats)}

    def sampling_rule(self, entropy: torch.Tensor) -> TemperatureRule | None:
        if not self.cfg.tau:
            return None
        return TemperatureRule(entropy_stats(entropy, q=self.cfg.entropy_quantile), self.cfg.tau)

    def token_loss(self, t: TokenTensors):
        c = self.cfg
        loss, metrics = hapo_token_loss(
            t.logp,
            t.old_logp,
            t.advantages,
            t.extra["h_hat"],
            c.clip_eps_low,
            c.clip_eps_high,
            c.alpha,
            c.beta,
            c.dual_clip,
            c.adaptive_clip,
            c.redistribute,
        )
        return self.add_regularisers(t, loss, metrics)
