"""The keys of asynchronous training: streaming generation and the off-policy corrections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlpost.config.base import Section
from rlpost.config.yaml_file import UNBOUNDED_OK


class StreamConfig(Section):
    """Streaming generation (`rollout.async_mode: streaming`; rlpost/jobs/streaming.py)."""

    too_stale: Literal["drop", "wait"] = Field(
        "drop",
        description="a finished group with a response lagging more than rollout.staleness steps: "
        "drop it (counted in staleness/dropped_samples); wait: no engine starts a generation that could "
        "end past that lag, it waits for the learners instead",
    )
    chunk_prompts: int | None = Field(
        None,
        gt=0,
        description="prompts per generation call of an engine (its unit of work between weight "
        "updates); None: prompts_per_step / num_workers",
    )
    partial: bool = Field(
        False,
        description="partial rollouts: generations stop at each weight update and continue "
        "from their prefix with the new weights, segment_tokens at a time",
    )
    segment_tokens: int = Field(64, gt=0, description="partial rollouts: new tokens per generation segment")


class OffPolicyConfig(Section):
    """Off-policy corrections (docs/algorithms.md section 7): each token's loss times a weight
    w_t from the learner's recomputed log-probs (pi_prox) and the engine's (pi_b)."""

    correction: Literal["none", "decoupled", "tis", "icepop", "seq_mask"] = Field(
        "none",
        description="none: w = 1; decoupled: w = pi_prox / pi_b; tis: min(pi_prox / pi_b, tis_cap); "
        "icepop: pi_prox / pi_b inside [icepop_low, icepop_high], else 0; seq_mask: the "
        "sequence ratio min(rho_i, seq_cap), 0 for the whole sequence outside [seq_low, seq_high]",
    )
    tis_cap: float = Field(2.0, gt=0, json_schema_extra=UNBOUNDED_OK)  # inf: no bound
    icepop_low: float = Field(0.5, ge=0)
    icepop_high: float = Field(5.0, gt=0, json_schema_extra=UNBOUNDED_OK)  # inf: no bound
    seq_cap: float = Field(2.0, gt=0, json_schema_extra=UNBOUNDED_OK)  # inf: no bound
    seq_low: float = Field(0.5, ge=0)
    seq_high: float = Field(2.0, gt=0, json_schema_extra=UNBOUNDED_OK)  # inf: no bound
    seq_geometric: bool = Field(
        False, description="seq_mask: rho_i = exp(mean_t log ratio) instead of the product"
    )
