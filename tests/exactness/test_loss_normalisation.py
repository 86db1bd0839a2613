"""The GRPO loss and its gradients do not depend on how a mini-batch is cut.

One mini-batch of 8 sequences of different lengths (2 groups of 4) is trained
on DeepSpeed learners split into 1, 2 and 4 micro-batches per rank (by sequence
count when padded, by token budget when packed into one row), on 1 rank (in
this process) and on 2 ranks (Ray actors, gloo). Loss, gradients (ZeRO-0)
and the global gradient norm (ZeRO-2) must equal an independent computation of
the formula with full logits: l = max(-A*rho, -A*clip(rho, 0.8, 1.2)) per
token, aggregated by token-mean, seq-mean-token-mean or balanced aggregation.
Tolerance: fp32, rtol 1e-5 / atol 1e-7 on losses and gradients.
"""

from __future__ import annotations

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.config.rl import TrainConfig
from rlpost.data.batch import Sample, shard, view
from rlpost.jobs.update import train_minibatches
from rlpost.model.load import load_model
from rlpost.workers.group import WorkerGroup
from rlpost.workers.learner import LRSchedule, start_learner_group
from tests.run_helpers import assert_gradients_match

RTOL, ATOL = 1e-5, 1e-7


def algo(loss_agg: str = "token-mean") -> tuple[str, dict]:
    return "grpo", {"clip_eps_low": 0.2, "clip_eps_high": 0.2, "loss_agg": loss_agg}


def make_samples(seed: int = 0, loss_agg: str = "token-mean") -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, (p_len, r_len) in enumerate([(4, 1), (6, 5), (3, 9), (5, 2), (7, 3), (4, 7), (6, 1), (3, 4)]):
        ids = torch.randint(3, 15, (p_len + r_len,), generator=g).tolist()
        adv = torch.randn((), generator=g).item()
        samples.append(
            Sample(
                prompt_ids=[1] + ids[:p_len],
                response_ids=ids[p_len:],
                group=i // 4,
                advantages=torch.full((r_len,), adv),
                # old log-probs far enough from the current ones that clipping fires
                old_logp=torch.log(torch.rand(r_len, generator=g) * 0.2 + 0.02),
            )
        )
    weights = build_algorithm(*algo(loss_agg)).token_weights(view(samples))
    for s, w in zip(samples, weights.split([s.num_tokens for s in samples])):
        s.weights = w
    return samples


def aggregate(per_seq: list[torch.Tensor], samples: list[Sample], loss_agg: str) -> torch.Tensor:
    """docs/algorithms.md "Aggregation", written out from the per-sequence token sums."""
    lengths = [s.num_tokens for s in samples]
    if loss_agg == "token-mean":
        return torch.stack(per_seq).sum() / sum(lengths)
    if loss_agg == "seq-mean-token-mean":
        return torch.stack([loss / n for loss, n in zip(per_seq, lengths)]).mean()
    groups = []  # balanced: (k/G) m+ + (n-/G) m- per group, averaged over groups
    for g in sorted({s.group for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.group == g]
        pos = [i for i in idx if samples[i].advantages[0] > 0]
        neg = [i for i in idx if samples[i].advantages[0] < 0]
        side = lambda ids: sum(per_seq[i] for i in ids) / sum(lengths[i] for i in ids)  # noqa: E731
        groups.append(len(pos) / len(idx) * side(pos) + len(neg) / len(idx) * side(neg))
    return torch.stack(groups).mean()


def surrogate_sums(model, samples) -> list[torch.Tensor]:
    """Per sequence, the sum over its tokens of the clipped surrogate, from full logits."""
    losses = []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logits = model(input_ids=ids).logits[0].float()
        p = len(s.prompt_ids)
        logp = logits[p - 1 : -1].log_softmax(-1).gather(-1, ids[0, p:, None]).squeeze(-1)
        ratio = torch.exp(logp - s.old_logp)
        a = s.advantages
        losses.append(torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)).sum())
    return losses


def reference(model_dir, samples, loss_agg: str = "token-mean"):
    """Independent: full logits, log_softmax, the clipped surrogate, the aggregation."""
    model = load_model(model_dir)
    loss = aggregate(surrogate_sums(model, samples), samples, loss_agg)
    loss.backward()
    grads = {"lm." + n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    return loss.item(), grads, norm


def learner_group(
    model_dir, world: int, zero_stage: int, loss_agg: str = "token-mean", packing: str = "padded"
) -> WorkerGroup:
    cfg = TrainConfig(mode="ray" if world > 1 else "inprocess")
    cfg.learner.packing = packing
    cfg.learner.num_learners = world
    cfg.learner.zero_stage = zero_stage
    cfg.learner.grad_clip = 0.0
    return start_learner_group(cfg, model_dir, algo(loss_agg), LRSchedule(1e-3), pad_id=0, use_ray=world > 1)


def run_split(group: WorkerGroup, samples, apply: bool, **split):
    parts = shard(samples, len(group), **split)
    results = group.call("train_minibatch", per_rank=[(p, apply) for p in parts])
    merged = results[0]
    for m in results[1:]:
        merged.merge(m)
    return merged.result()


# The 8 sequences hold 78 prompt + response tokens; the longest is 13 (12 splits it off alone).
SPLITS = {
    "padded": [dict(max_seqs=m) for m in (8, 4, 2)],  # per rank: 1, 2, 4 micro-batches
    "packed": [dict(max_tokens=t) for t in (None, 40, 20, 12)],
}


@pytest.mark.parametrize(
    "world, loss_agg, packing",
    [
        (1, "token-mean", "padded"),
        (1, "token-mean", "packed"),
        (2, "token-mean", "padded"),
        (2, "seq-mean-token-mean", "padded"),
        (2, "balanced", "padded"),
        (2, "balanced", "packed"),
    ],
)
def test_loss_and_gradients_match_formula_for_every_split(model_dir, world, loss_agg, packing, request):
    if world > 1:
        request.getfixturevalue("ray_cluster")
    samples = make_samples(loss_agg=loss_agg)
    ref_loss, ref_grads, _ = reference(model_dir, samples, loss_agg)
    group = learner_group(model_dir, world, zero_stage=0, loss_agg=loss_agg, packing=packing)
    assert_every_split_matches(group, samples, packing, ref_loss, ref_grads)


def assert_every_split_matches(group: WorkerGroup, samples, packing: str, ref_loss, ref_grads) -> None:
    """Under every split of SPLITS[packing], the learners' loss and summed gradients equal
    the reference; the group is shut down after."""
    try:
        for split in SPLITS[packing]:
            metrics = run_split(group, samples, apply=False, packed=packing == "packed", **split)
            assert metrics["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
            assert_gradients_match(group, ref_grads, RTOL, ATOL)
    finally:
        group.shutdown()


def test_zero2_two_ranks_grad_norm_matches_formula(model_dir, ray_cluster):
    samples = make_samples(seed=1)
    ref_loss, _, ref_norm = reference(model_dir, samples)
    for world in (1, 2):
        group = learner_group(model_dir, world, zero_stage=2)
        try:
            metrics = run_split(group, samples, apply=True, max_seqs=2)
        finally:
            group.shutdown()
        assert metrics["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
        assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)


def test_one_call_trains_each_minibatch_on_its_own_loss(model_dir):
    """`train_minibatches` hands a step's mini-batches to the learners in one call. Each
    mini-batch is weighted over its own tokens, also where mini-batches share samples (as
    with learner.epochs > 1), and gets its own optimizer step: the losses reported are the
    formula's for each mini-batch in turn, with an AdamW step between them."""
    samples = make_samples()
    minibatches = [samples[:5], samples[2:]]  # samples 2-4 in both
    model = load_model(model_dir)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-3, weight_decay=TrainConfig().learner.weight_decay
    )
    want = []
    for mb in minibatches:
        loss = aggregate(surrogate_sums(model, mb), mb, "token-mean")
        want.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():  # the second mini-batch's loss had there been no step between
        unstepped = aggregate(
            surrogate_sums(load_model(model_dir), minibatches[1]), minibatches[1], "token-mean"
        ).item()
    assert abs(unstepped - want[1]) > 100 * RTOL * abs(want[1])

    group = learner_group(model_dir, world=1, zero_stage=0)
    try:
        got = train_minibatches(
            group, build_algorithm(*algo()), minibatches, lambda mb: shard(mb, 1, max_seqs=2, packed=False)
        )
    finally:
        group.shutdown()
    assert [m.result()["loss"] for m in got] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("world", [1, 2])
def test_score_and_train_equals_scoring_then_training(model_dir, world, request):
    """The RL step's one-call path (`jobs.update.score_and_train`: each learner rank scores the
    samples it trains on, then trains) against the two-call path (log-prob pass over the
    whole batch, then `train_minibatches`): the same old log-probs, which are the formula's
    (full logits of the initial model), the same losses and the same weights after."""
    if world > 1:
        request.getfixturevalue("ray_cluster")
    from rlpost.jobs.update import score_and_train

    def fresh_samples():
        samples = make_samples()
        for s in samples:
            s.old_logp = None
        return samples

    def cut(mb):
        return shard(mb, world, max_seqs=2, packed=False)

    model = load_model(model_dir)
    with torch.no_grad():
        formula = []
        for s in make_samples():
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logp = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1].float().log_softmax(-1)
            formula.append(logp.gather(-1, ids[0, len(s.prompt_ids) :, None]).squeeze(-1))

    results = []
    for one_call in (False, True):
        samples = fresh_samples()
        minibatches = [samples[:4], samples[4:]]
        group = learner_group(model_dir, world=world, zero_stage=0)
        try:
            if one_call:
                metrics, entropies = score_and_train(
                    group, build_algorithm(*algo()), minibatches, cut, with_ref=False
                )
                assert sorted(entropies) == sorted(id(s) for s in samples)
            else:
                parts = cut(samples)
                scores = group.call("logprobs", per_rank=[(p, False, None) for p in parts])
                for rank, r in zip(parts, scores):
                    ordered = [s for micro in rank for s in micro]
                    for s, lp in zip(ordered, r["logp"].split([s.num_tokens for s in ordered])):
                        s.old_logp = lp
                metrics = train_minibatches(group, build_algorithm(*algo()), minibatches, cut)
            params = group.call("named_parameters")[0]
        finally:
            group.shutdown()
        for s, want in zip(samples, formula):
            torch.testing.assert_close(s.old_logp, want, rtol=RTOL, atol=1e-6)
        results.append(([m.result()["loss"] for m in metrics], params))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_b == pytest.approx(loss_a, rel=RTOL) and loss_a[0] != 0
    # Adam divides by sqrt(v): where a gradient is ~0, fp32 rounding of the 2-rank sums
    # (summed in another order) moves a weight by up to ~1e-6; 1e-5 is 1% of one lr step
    for name, value in params_a.items():
        torch.testing.assert_close(params_b[name], value, rtol=RTOL, atol=1e-5)
