"""Loss-based sample reweighting (docs/algorithms.md section 8) on real learners does not
depend on how an optimizer step is cut.

A token loss (SFT's nll, `rlpost sft`), an RL loss (GRPO's clipped surrogate, token-mean)
and a pair loss (DPO) are trained with reweighting cut into micro-batches of at most 8, 4
and 2 sequences (on one rank 1, 2 and 4 micro-batches; packed: token budgets of all, 40 and
20 tokens; 6 pairs: 1, 3 and 6 micro-batches), on 1 rank in this process and on 2 Ray
ranks (SFT also with 3 sequences, 1 on one rank and 2 on the other: unequal numbers of
losses to gather). Loss and gradients (ZeRO-0) must equal
an independent computation from full logits: each sample's loss l_i (the mean over its
tokens under token-mean; a pair's DPO loss), N w_i from the formula written out in
tests/algorithms/test_reweighting.py, then sum_i N w_i (sample i's share of the unweighted
loss), with no gradient through w. Also: with reweighting off or in its burn-in, the step
runs one forward per micro-batch and gives bit for bit the same loss and gradients, and
with equal losses reweighting is bit for bit the unweighted step.
Tolerance: fp32, rtol 1e-5 / atol 1e-7.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import logsigmoid

from rlpost.algorithms import build_algorithm
from rlpost.config.offline import DPOJobConfig, SFTJobConfig
from rlpost.config.rl import TrainConfig
from rlpost.data.batch import Sample, shard, view
from rlpost.data.pairs import pair_samples, shard_pairs
from rlpost.jobs.update import train_minibatches
from rlpost.model.load import load_model
from rlpost.tracking.metrics import MetricSums
from rlpost.workers.learner import LRSchedule, start_learner_group
from tests.algorithms.test_reweighting import expected_multipliers
from tests.exactness.test_loss_normalisation import algo, make_samples, surrogate_sums
from tests.exactness.test_offline_exactness import full_tokens, learner_group, make_pairs, model_dir  # noqa: F401
from tests.run_helpers import assert_gradients_match

RTOL, ATOL = 1e-5, 1e-7
BETA = 0.5
TOKEN_SPLITS = {  # 8 sequences: per rank on one rank, 1, 2 and 4 micro-batches
    "padded": [dict(max_seqs=m) for m in (8, 4, 2)],
    "packed": [dict(max_tokens=t) for t in (None, 40, 20)],
}


def token_group(model_dir, cfg, world: int, packing: str, algorithm: tuple[str, dict]):
    cfg.mode = "ray" if world > 1 else "inprocess"
    cfg.learner.num_learners, cfg.learner.zero_stage = world, 0
    cfg.learner.grad_clip, cfg.learner.packing = 0.0, packing
    return start_learner_group(cfg, model_dir, algorithm, LRSchedule(1e-3), pad_id=0, use_ray=world > 1)


def token_step(group, samples, apply: bool, packed: bool, **split) -> dict[str, float]:
    results = group.call(
        "train_minibatch", per_rank=[(p, apply) for p in shard(samples, len(group), **split, packed=packed)]
    )
    return merged(results)


def merged(results: list[MetricSums]) -> dict[str, float]:
    out = MetricSums()
    for m in results:
        out.merge(m)
    return out.result()


def response_logp(model, s: Sample) -> torch.Tensor:
    ids = torch.tensor([s.prompt_ids + s.response_ids])
    p = len(s.prompt_ids)
    logp = model(input_ids=ids).logits[0, p - 1 : -1].float().log_softmax(-1)
    return logp.gather(-1, ids[0, p:, None]).squeeze(-1)


def reweighted(model, sums: list[torch.Tensor], counts: list[int], scheme: str, denominator: float):
    """sum_i N w_i sums_i / denominator, l_i = sums_i / counts_i; its gradients and N w."""
    m = expected_multipliers([x.item() / n for x, n in zip(sums, counts)], scheme)
    loss = sum(mi * x for mi, x in zip(m, sums)) / denominator
    loss.backward()
    return loss.item(), {"lm." + n: p.grad.clone() for n, p in model.named_parameters()}, m


def assert_matches(group, metrics, ref_loss, ref_grads, m):
    assert metrics["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
    assert_gradients_match(group, ref_grads, RTOL, ATOL)
    assert metrics["reweight/weight_max"] == pytest.approx(max(m), rel=1e-5)
    assert metrics["reweight/weight_min"] == pytest.approx(min(m), rel=1e-5)
    assert max(m) > 1.5 * min(m)  # the weights are far from uniform: they matter


def sft_samples(count: int = 8) -> list[Sample]:
    samples = [Sample(prompt_ids=s.prompt_ids, response_ids=s.response_ids) for s in make_samples(seed=3)]
    samples = samples[:count]
    weights = build_algorithm("sft", {}).token_weights(view(samples))
    for s, w in zip(samples, weights.split([s.num_tokens for s in samples])):
        s.weights = w
    return samples


def sft_cfg(section: dict) -> SFTJobConfig:
    return SFTJobConfig(data={"path": "unused.jsonl"}, algorithm={"loss": "nll"}, reweighting=section)


@pytest.mark.parametrize("world", [1, 2])
def test_sft_matches_formula_for_every_split(model_dir, world, request):  # noqa: F811
    if world > 1:
        request.getfixturevalue("ray_cluster")
    group = token_group(model_dir, sft_cfg({"scheme": "linupper"}), world, "padded", ("sft", {"loss": "nll"}))
    try:
        # 3 sequences: 2 on one rank and 1 on the other, which gather unequal numbers of losses
        for count, splits in ((8, TOKEN_SPLITS["padded"]), (3, [dict(max_seqs=1)])):
            samples, model = sft_samples(count), load_model(model_dir)
            sums = [-response_logp(model, s).sum() for s in samples]
            counts = [s.num_tokens for s in samples]
            ref = reweighted(model, sums, counts, "linupper", sum(counts))  # token-mean
            for split in splits:
                assert_matches(group, token_step(group, samples, False, False, **split), *ref)
    finally:
        group.shutdown()


@pytest.mark.parametrize("world, packing", [(1, "packed"), (2, "padded")])
def test_grpo_matches_formula_for_every_split(model_dir, world, packing, request):  # noqa: F811
    if world > 1:
        request.getfixturevalue("ray_cluster")
    samples = make_samples(seed=4)  # old log-probs far from the policy's: the clip fires
    model = load_model(model_dir)
    counts = [s.num_tokens for s in samples]
    ref = reweighted(model, surrogate_sums(model, samples), counts, "extremes", sum(counts))
    cfg = TrainConfig(reweighting={"scheme": "extremes"})
    group = token_group(model_dir, cfg, world, packing, algo())
    try:
        for split in TOKEN_SPLITS[packing]:
            assert_matches(group, token_step(group, samples, False, packing == "packed", **split), *ref)
    finally:
        group.shutdown()


def pair_step(group, pairs, apply: bool, **split) -> dict[str, float]:
    parts = shard_pairs(pair_samples(pairs, False), len(group), packed=False, **split)
    return merged([m for m, _ in group.call("train_pairs", per_rank=[(p, len(pairs), apply) for p in parts])])


@pytest.mark.parametrize("world", [1, 2])
def test_dpo_matches_formula_for_every_split(model_dir, world, request):  # noqa: F811
    if world > 1:
        request.getfixturevalue("ray_cluster")
    section = {"scheme": "mid", "burn_in_steps": 1}
    cfg = DPOJobConfig(
        data={"path": "unused.jsonl"}, algorithm={"loss": "dpo", "beta": BETA}, reweighting=section
    )
    pairs = make_pairs()
    group = learner_group(model_dir, cfg, world, "padded", lr=1e-2)
    try:
        # the burn-in step, unweighted, moves the policy away from the reference
        assert not [k for k in pair_step(group, pairs[:3], apply=True) if k.startswith("reweight/")]
        group.call("zero_grad")
        policy, ref = load_model(model_dir), load_model(model_dir)
        policy.load_state_dict(group.call("export_weights")[0])
        losses = []
        for p in pairs:
            lw, rw, _, _ = full_tokens(policy, ref, p.prompt_ids, p.chosen_ids, False)
            ll, rl, _, _ = full_tokens(policy, ref, p.prompt_ids, p.rejected_ids, False)
            losses.append(-logsigmoid(BETA * ((lw - rw).sum() - (ll - rl).sum())))
        want = reweighted(policy, losses, [1] * len(pairs), "mid", len(pairs))
        for split in [dict(max_seqs=m) for m in (12, 4, 2)]:
            assert_matches(group, pair_step(group, pairs, apply=False, **split), *want)
    finally:
        group.shutdown()


def test_off_and_burn_in_run_the_unchanged_step(model_dir):  # noqa: F811
    """scheme none and a step in the burn-in: one forward per micro-batch, no reweight/*
    metrics, the same loss and gradients bit for bit; after the burn-in, two forwards."""
    samples, runs = sft_samples(), {}
    for name, section in {
        "none": {},
        "burn_in": {"scheme": "linupper", "burn_in_steps": 1},
        "active": {"scheme": "linupper"},
    }.items():
        group = token_group(model_dir, sft_cfg(section), 1, "padded", ("sft", {"loss": "nll"}))
        learner = group.workers[0]
        calls, terms = [], learner._token_terms
        learner._token_terms = lambda mb, terms=terms, calls=calls: calls.append(len(mb)) or terms(mb)
        try:
            metrics = token_step(group, samples, False, False, max_seqs=2)  # 4 micro-batches
            runs[name] = (metrics, group.call("gradients")[0], len(calls))
        finally:
            group.shutdown()
    (off, off_grads, off_calls), (burn, burn_grads, burn_calls), (on, _, on_calls) = runs.values()
    assert off_calls == burn_calls == 4 and on_calls == 8
    assert off["loss"] == burn["loss"] and off["loss"] != on["loss"]
    assert off_grads.keys() == burn_grads.keys()
    assert all(torch.equal(off_grads[k], burn_grads[k]) for k in off_grads)
    assert not [k for k in (*off, *burn) if k.startswith("reweight/")]
    assert on["reweight/unweighted_loss"] == pytest.approx(off["loss"], rel=1e-12)


def test_equal_losses_train_exactly_as_unweighted(model_dir):  # noqa: F811
    one = sft_samples(1)[0]
    samples = [Sample(prompt_ids=one.prompt_ids, response_ids=one.response_ids) for _ in range(4)]
    for s in samples:
        s.weights = torch.full((s.num_tokens,), 1 / (4 * s.num_tokens), dtype=torch.float64)
    runs = []
    for section in ({}, {"scheme": "extremes"}):
        group = token_group(model_dir, sft_cfg(section), 1, "padded", ("sft", {"loss": "nll"}))
        try:
            runs.append((token_step(group, samples, False, False, max_seqs=2), group.call("gradients")[0]))
        finally:
            group.shutdown()
    (off, off_grads), (on, on_grads) = runs
    assert on["reweight/weight_max"] == on["reweight/weight_min"] == 1.0
    assert on["loss"] == off["loss"]
    assert all(torch.equal(on_grads[k], off_grads[k]) for k in off_grads)


def test_burn_in_counts_the_optimizer_steps_of_an_rl_step(model_dir):  # noqa: F811
    """Two mini-batches of one RL step are two optimizer steps: with burn_in_steps 1 the
    first trains unweighted, the second reweighted."""
    samples = make_samples(seed=4)
    cfg = TrainConfig(reweighting={"scheme": "linupper", "burn_in_steps": 1})
    group = token_group(model_dir, cfg, 1, "padded", algo())
    try:
        split = lambda mb: shard(mb, 1, max_seqs=2, packed=False)  # noqa: E731
        first, second = train_minibatches(group, build_algorithm(*algo()), [samples[:4], samples[4:]], split)
    finally:
        group.shutdown()
    assert not [k for k in first.result() if k.startswith("reweight/")]
    assert second.result()["reweight/weight_max"] > 1.0
