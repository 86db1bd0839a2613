"""Off-policy corrections in the learner do not depend on how a mini-batch is cut.

One mini-batch of 8 sequences (2 groups of 4) whose engine log-probs (Sample.rollout_logp,
pi_b) are planted off the learner's old log-probs (pi_prox) so that every branch of the
correction fires: tokens (tis, icepop) or whole sequences (seq_mask, product and geometric)
inside the bounds, capped and masked. Trained by GRPO on DeepSpeed learners (ZeRO-0) split
into 1, 2 and 4 micro-batches (padded) or by token budget (packed), in this process, and on
2 Ray ranks for seq_mask. Loss, gradients and the off_policy/* metrics must equal an
independent full-batch computation: sum_t weight_t * w_t * l_t with full logits, l_t the
clipped surrogate, weight_t the aggregation's (token-mean or seq-mean-token-mean; a w_t of 0
keeps its token in the normalisers) and w_t from the formulas of docs/algorithms.md
section 7, written out per token in plain Python.
Tolerance: fp32, rtol 1e-5 / atol 1e-7 on losses and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.config.asynchrony import OffPolicyConfig
from rlpost.config.rl import TrainConfig
from rlpost.data.batch import Sample, view
from rlpost.model.load import load_model
from rlpost.workers.learner import Learner, LRSchedule, start_learner_group
from tests.exactness.test_loss_normalisation import SPLITS, run_split
from tests.run_helpers import assert_gradients_match

RTOL, ATOL = 1e-5, 1e-7
LENGTHS = [(4, 1), (6, 5), (3, 9), (5, 2), (7, 3), (4, 7), (6, 1), (3, 4)]  # (prompt, response)
TOKEN_RATIOS = [1.3, 0.3, 3.0, 0.8, 7.0, 1.7]  # cycled over tokens: tis caps 3, 7; icepop drops 0.3, 7
# per sequence, with seq_cap 1.5 in [0.5, 3]: masked (0.2, 5.0, 0.3), capped (2.0, 2.5), inside
SEQ_RHOS = [0.2, 5.0, 2.0, 0.8, 1.2, 0.3, 2.5, 1.0]
SEQ = dict(seq_cap=1.5, seq_low=0.5, seq_high=3.0)


def algo(loss_agg: str) -> tuple[str, dict]:
    return "grpo", {"clip_eps_low": 0.2, "clip_eps_high": 0.2, "loss_agg": loss_agg}


def planted_log_ratios(section: OffPolicyConfig, g: torch.Generator) -> list[torch.Tensor]:
    """log(pi_prox / pi_b) per token of each sequence."""
    if section.correction != "seq_mask":
        flat = torch.tensor(TOKEN_RATIOS * 10).log()
        ends = torch.tensor([r for _, r in LENGTHS]).cumsum(0).tolist()
        return [flat[end - r : end] for (_, r), end in zip(LENGTHS, ends)]
    out = []
    for (_, n), rho in zip(LENGTHS, SEQ_RHOS):  # random tokens that sum (or average) to log rho
        parts = torch.randn(n, generator=g) * 0.3
        target = math.log(rho) * (n if section.seq_geometric else 1)
        out.append(parts - (parts.sum() - target) / n)
    return out


def make_samples(section: OffPolicyConfig, loss_agg: str, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, ((p_len, r_len), log_ratio) in enumerate(zip(LENGTHS, planted_log_ratios(section, g))):
        ids = torch.randint(3, 15, (p_len + r_len,), generator=g).tolist()
        # old log-probs far enough from the current ones that clipping fires
        old_logp = torch.log(torch.rand(r_len, generator=g) * 0.2 + 0.02)
        samples.append(
            Sample(
                prompt_ids=[1] + ids[:p_len],
                response_ids=ids[p_len:],
                group=i // 4,
                advantages=torch.full((r_len,), torch.randn((), generator=g).item()),
                old_logp=old_logp,
                rollout_logp=(old_logp - log_ratio).tolist(),  # fp32 values, exactly as collated
            )
        )
    weights = build_algorithm(*algo(loss_agg)).token_weights(view(samples))
    for s, w in zip(samples, weights.split([s.num_tokens for s in samples])):
        s.weights = w
    return samples


def formula_weights(s: Sample, c: OffPolicyConfig) -> tuple[list[float], list[bool], list[bool]]:
    """w_t, capped and masked of one sequence's tokens (docs/algorithms.md section 7)."""
    ratios = [math.exp(p - b) for p, b in zip(s.old_logp.tolist(), s.rollout_logp)]
    n = len(ratios)
    if c.correction == "tis":
        return [min(r, c.tis_cap) for r in ratios], [r > c.tis_cap for r in ratios], [False] * n
    if c.correction == "icepop":
        inside = [c.icepop_low <= r <= c.icepop_high for r in ratios]
        return [r if k else 0.0 for r, k in zip(ratios, inside)], [False] * n, [not k for k in inside]
    rho = math.prod(ratios) ** (1 / n if c.seq_geometric else 1)
    inside = c.seq_low <= rho <= c.seq_high
    return [min(rho, c.seq_cap) if inside else 0.0] * n, [inside and rho > c.seq_cap] * n, [not inside] * n


def reference(model_dir, samples, section: OffPolicyConfig, loss_agg: str):
    """Independent: full logits, log_softmax, the clipped surrogate times w_t, the aggregation
    written out (1/N per token, or 1/(S |o_i|)); and the metrics over all tokens."""
    model = load_model(model_dir)
    total, tokens = 0.0, sum(s.num_tokens for s in samples)
    all_w, all_capped, all_masked = [], [], []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        p = len(s.prompt_ids)
        logp = model(input_ids=ids).logits[0, p - 1 : -1].float().log_softmax(-1)
        logp = logp.gather(-1, ids[0, p:, None]).squeeze(-1)
        ratio, a = torch.exp(logp - s.old_logp), s.advantages
        l_t = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
        w, capped, masked = formula_weights(s, section)
        agg = 1 / tokens if loss_agg == "token-mean" else 1 / (len(samples) * s.num_tokens)
        total = total + agg * (torch.tensor(w) * l_t).sum()
        all_w, all_capped, all_masked = all_w + w, all_capped + capped, all_masked + masked
    total.backward()
    grads = {"lm." + n: p.grad.clone() for n, p in model.named_parameters()}
    metrics = {
        "off_policy/weight_mean": sum(all_w) / tokens,
        "off_policy/weight_min": min(all_w),
        "off_policy/weight_max": max(all_w),
    }
    if section.correction in ("tis", "seq_mask"):
        metrics["off_policy/truncated_frac"] = sum(all_capped) / tokens
    if section.correction in ("icepop", "seq_mask"):
        metrics["off_policy/masked_frac"] = sum(all_masked) / tokens
    return total.item(), grads, metrics, (all_capped, all_masked)


def config(section: OffPolicyConfig, world: int, packing: str) -> TrainConfig:
    cfg = TrainConfig(mode="ray" if world > 1 else "inprocess", off_policy=section)
    cfg.learner.packing = packing
    cfg.learner.num_learners = world
    cfg.learner.zero_stage = 0
    cfg.learner.grad_clip = 0.0
    return cfg


CASES = [
    (1, OffPolicyConfig(correction="tis"), "token-mean", "padded"),
    (1, OffPolicyConfig(correction="icepop"), "token-mean", "packed"),
    (1, OffPolicyConfig(correction="seq_mask", **SEQ), "seq-mean-token-mean", "packed"),
    (1, OffPolicyConfig(correction="seq_mask", seq_geometric=True, **SEQ), "token-mean", "padded"),
    (2, OffPolicyConfig(correction="seq_mask", **SEQ), "token-mean", "padded"),
]


@pytest.mark.parametrize(
    "world, section, loss_agg, packing",
    CASES,
    ids=[f"{w}rank-{s.correction}{'-geo' if s.seq_geometric else ''}-{a}-{p}" for w, s, a, p in CASES],
)
def test_corrected_loss_and_gradients_match_formula_for_every_split(
    model_dir, world, section, loss_agg, packing, request
):
    if world > 1:
        request.getfixturevalue("ray_cluster")
    samples = make_samples(section, loss_agg)
    ref_loss, ref_grads, ref_metrics, (capped, masked) = reference(model_dir, samples, section, loss_agg)
    # every branch fires: some tokens capped or masked, some inside
    assert any(capped) or section.correction == "icepop"
    assert any(masked) or section.correction == "tis"
    assert not all(a or b for a, b in zip(capped, masked))
    group = start_learner_group(
        config(section, world, packing), model_dir, algo(loss_agg), LRSchedule(1e-3), 0, world > 1
    )
    try:
        for split in SPLITS[packing]:
            metrics = run_split(group, samples, False, packed=packing == "packed", **split)
            assert metrics["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
            assert {k: metrics[k] for k in ref_metrics} == pytest.approx(ref_metrics, rel=1e-6)
            assert_gradients_match(group, ref_grads, RTOL, ATOL)
        if world == 1:  # a correction without the engine's log-probs is refused, by name
            samples[3].rollout_logp = samples[3].rollout_logp[:-1]
            with pytest.raises(ValueError, match=r"off_policy.correction .*\(Sample.rollout_logp\)"):
                run_split(group, samples, False, packed=packing == "packed", **SPLITS[packing][0])
    finally:
        group.shutdown()


def test_only_policy_gradient_learners_of_rl_jobs_correct(model_dir):
    """`rlpost train`'s SFT warm-up learners get the RL config but train on data no engine
    sampled: no correction for them, none under correction 'none'."""

    def learner(correction: str, name: str) -> Learner:
        cfg = config(OffPolicyConfig(correction=correction), 1, "padded")
        return Learner(cfg, str(model_dir), (name, {}), LRSchedule(1e-3), rank=0, world_size=1, pad_id=0)

    assert learner("tis", "grpo").correction.correction == "tis"
    assert learner("tis", "sft").correction is None
    assert learner("none", "grpo").correction is None
