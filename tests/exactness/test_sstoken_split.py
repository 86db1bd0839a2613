"""ssToken on the DeepSpeed learner does not depend on how a mini-batch is cut.

Eight samples of different lengths train by `Learner.train_minibatch` (ZeRO-0, fp32) with
history model "reference" (the frozen start model) or "ema", in 1, 2 or 4 padded
micro-batches or under token budgets (packed), on 1 rank in this process and on 2 Ray ranks.
The policy first takes one optimizer step at a large learning rate, so that REL is far from
0 (and the EMA has moved). Loss, gradients and the metrics must equal an independent
computation written from the formulas one sequence at a time: full logits, the history
model's log-probs (the EMA's weights as decay theta_0 + (1 - decay) theta_1), the last
layer's full attention matrix (eager, every head), REL' by min-max, top ceil(rho |y|) by
score. Tolerance: fp32, rtol 1e-5 / atol 1e-7 on losses and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.config.offline import SFTJobConfig
from rlpost.data.batch import Sample, shard, view
from rlpost.model.load import load_model
from rlpost.workers.learner import LRSchedule, start_learner_group
from tests.run_helpers import assert_gradients_match

RTOL, ATOL = 1e-5, 1e-7
GAMMA, RHO, DECAY = 0.5, 0.6, 0.75
LENGTHS = [(3, 5), (6, 2), (2, 9), (5, 4), (4, 7), (7, 3), (2, 6), (3, 1)]  # (prompt, response)
SPLITS = {
    "padded": [dict(max_seqs=m) for m in (8, 4, 2)],  # 1, 2, 4 micro-batches per rank
    "packed": [dict(max_tokens=t) for t in (None, 40, 20)],
}


def make_samples(seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 15, (n,), generator=g).tolist()  # noqa: E731
    return [Sample(prompt_ids=[1] + ids(p - 1), response_ids=ids(r)) for p, r in LENGTHS]


def top(score: list[float], k: int) -> set[int]:
    """The k highest scores' positions, the earlier first among equal scores."""
    return set(sorted(range(len(score)), key=lambda i: (-score[i], i))[:k])


def reference(model_dir, weights: dict, history_weights: dict | None, samples: list[Sample]):
    """Loss, gradients and metrics of one step from the formulas, one sequence at a time."""
    policy, history = load_model(model_dir), load_model(model_dir)
    policy.load_state_dict(weights)
    if history_weights is not None:
        history.load_state_dict(history_weights)
    policy.set_attn_implementation("eager")
    total, count, nll_all, nll_sel, rels, attns, picked = 0.0, 0, [], [], [], [], 0
    for s in samples:
        ids, p = torch.tensor([s.prompt_ids + s.response_ids]), len(s.prompt_ids)
        out = policy(input_ids=ids, output_attentions=True)
        logp = out.logits[0, p - 1 : -1].log_softmax(-1).gather(-1, ids[0, p:, None])[:, 0]
        attn = out.attentions[-1][0, :, p:, :p].sum(-1).mean(0).detach()  # y_t's own row
        with torch.no_grad():
            hist = history(input_ids=ids).logits[0, p - 1 : -1].log_softmax(-1)
            hist = hist.gather(-1, ids[0, p:, None])[:, 0]
        rel = (logp.detach() - hist).double()
        span = rel.max() - rel.min()
        rel_norm = (rel - rel.min()) / span if span > 0 else torch.zeros_like(rel)
        score = (GAMMA * rel_norm + (1 - GAMMA) * attn.double()).tolist()
        k = math.ceil(RHO * len(score) - 1e-9)
        chosen = sorted(top(score, k))
        total = total - logp[chosen].sum()
        count += k
        picked += len(chosen)
        nll_all += (-logp.detach()).tolist()
        nll_sel += (-logp.detach()[chosen]).tolist()
        rels += rel.tolist()
        attns += attn.tolist()
    loss = total / count
    loss.backward()
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    metrics = {
        "nll": mean(nll_all),
        "nll_selected": mean(nll_sel),
        "sstoken/selected_frac": picked / len(nll_all),
        "sstoken/rel_mean": mean(rels),
        "sstoken/attn_mean": mean(attns),
    }
    return loss.item(), {"lm." + n: q.grad.clone() for n, q in policy.named_parameters()}, metrics


def sft_step(group, algorithm, samples, apply: bool, **split):
    weights = algorithm.token_weights(view(samples))
    for s, w in zip(samples, weights.split([s.num_tokens for s in samples])):
        s.weights = w
    results = group.call(
        "train_minibatch", per_rank=[(p, apply) for p in shard(samples, len(group), **split)]
    )
    merged = results[0]
    for m in results[1:]:
        merged.merge(m)
    return merged.result()


@pytest.mark.parametrize(
    "history, packing, world",
    [("reference", "padded", 1), ("ema", "packed", 1), ("reference", "packed", 1), ("ema", "padded", 2)],
)
def test_sstoken_loss_gradients_and_metrics_match_formula_for_every_split(
    model_dir, history, packing, world, request
):
    if world > 1:
        request.getfixturevalue("ray_cluster")
    params = {"history_model": history, **({"ema_decay": DECAY} if history == "ema" else {})}
    cfg = SFTJobConfig(
        data={"path": "unused.jsonl"},
        algorithm={"name": "sstoken", **params},
        mode="ray" if world > 1 else "inprocess",
    )
    cfg.learner.num_learners, cfg.learner.zero_stage = world, 0
    cfg.learner.grad_clip, cfg.learner.packing = 0.0, packing
    algorithm = build_algorithm(*cfg.algorithm_spec())
    samples = make_samples()
    initial = load_model(model_dir).state_dict()
    group = start_learner_group(
        cfg, model_dir, cfg.algorithm_spec(), LRSchedule(3e-2), pad_id=0, use_ray=world > 1
    )
    try:
        sft_step(group, algorithm, make_samples(seed=1), apply=True, packed=packing == "packed")
        group.call("zero_grad")
        weights = group.call("export_weights")[0]
        ema = (
            {n: DECAY * initial[n] + (1 - DECAY) * weights[n] for n in initial} if history == "ema" else None
        )
        ref_loss, ref_grads, ref_metrics = reference(model_dir, weights, ema, samples)
        assert abs(ref_metrics["sstoken/rel_mean"]) > 1e-2  # the history is not the policy
        for split in SPLITS[packing]:
            result = sft_step(group, algorithm, samples, apply=False, packed=packing == "packed", **split)
            assert result["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL), split
            assert_gradients_match(group, ref_grads, RTOL, ATOL)
            for name, want in ref_metrics.items():
                assert result[name] == pytest.approx(want, rel=1e-5, abs=1e-6), (split, name)
    finally:
        group.shutdown()
