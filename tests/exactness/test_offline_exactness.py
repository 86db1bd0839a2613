"""Preference and SFT losses on the DeepSpeed learner do not depend on how a mini-batch is cut.

Six preference pairs of different lengths are trained by `Learner.train_pairs` in
pair-atomic micro-batches of 1, 2 or all 6 pairs (padded) or under token budgets (packed),
on 1 rank in this process and on 2 ranks on Ray (slow tier). The policy first takes one
optimizer step at a large learning rate, so that it differs from the reference (the KL
terms and the log-ratios are then far from 0). Loss, gradients (ZeRO-0) and the metrics of
`preference_metrics` must equal an independent computation with full logits of the
formulas of docs/algorithms.md section 2, one sequence at a time, with SparsePO's activation
masks taken from hooks that keep the whole activations and materialised logits. The SFT
losses (nll, dft, asft) go through `Learner.train_minibatch` the same way.
Tolerance: fp32, rtol 1e-5 / atol 1e-7 on losses and gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import logsigmoid

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.preference import preference_metrics
from rlpost.algorithms.sparsepo import activation_mask
from rlpost.config.offline import DPOJobConfig, SFTJobConfig
from rlpost.config.sections import ModelConfig
from rlpost.data.batch import Sample, shard, view
from rlpost.data.datasets import PreferencePair
from rlpost.data.pairs import pair_samples, shard_pairs
from rlpost.model.load import load_model, materialise_initial_model
from rlpost.workers.group import WorkerGroup
from rlpost.workers.learner import Learner, LRSchedule, start_learner_group
from rlpost.workers.pair_learner import PairLearner
from tests.run_helpers import assert_gradients_match

RTOL, ATOL = 1e-5, 1e-7
BETA, ALPHA, LAMBDA_U, LAMBDA_D = 0.5, 0.3, 0.02, 0.01
LOSSES = {
    "dpo": {"loss": "dpo", "beta": BETA},
    "cdpo": {"loss": "cdpo", "beta": BETA},
    "tdpo1": {"loss": "tdpo1", "beta": BETA},
    "tdpo2": {"loss": "tdpo2", "beta": BETA, "alpha": ALPHA},
    "sparsepo": {"loss": "sparsepo", "beta": BETA, "lambda_u": LAMBDA_U, "lambda_d": LAMBDA_D},
}
# Pairs of 17 to 22 tokens (prompt twice + both responses), 120 in all. Per rank on one rank:
# padded 6 | 4 + 2 | 1 x 6 pairs per micro-batch, packed 6 | 2 + 2 + 1 + 1 | 1 x 6.
SPLITS = {
    "padded": [dict(max_seqs=m) for m in (12, 8, 2)],
    "packed": [dict(max_tokens=t) for t in (None, 40, 20)],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    return materialise_initial_model(
        ModelConfig(hidden_size=64, intermediate_size=128),
        "0123456789+=abcdef",
        seed=0,
        out_dir=d,
        max_len=64,
    )


def make_pairs(seed: int = 0) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 21, (n,), generator=g).tolist()  # noqa: E731
    return [
        PreferencePair(
            row=i,
            prompt_ids=[1] + ids(p),
            chosen_ids=ids(w),
            rejected_ids=ids(r),
            rejected_weights=torch.rand(r, generator=g).tolist(),
        )
        for i, (p, w, r) in enumerate([(4, 1, 6), (6, 5, 2), (3, 9, 1), (5, 2, 7), (7, 3, 3), (2, 7, 8)])
    ]


# ----- the independent computation --------------------------------------------------------


def full_tokens(policy, ref, prompt: list[int], response: list[int], masks: bool):
    """Per response token: policy log-prob (with grad), reference log-prob, full-vocabulary
    KL(ref || policy), and SparsePO's activation mask from whole hooked activations."""
    ids = torch.tensor([prompt + response])
    rows = slice(len(prompt) - 1, ids.shape[1] - 1)  # the positions that predict the response
    target = ids[0, len(prompt) :, None]
    log_p = policy(input_ids=ids).logits[0, rows].float().log_softmax(-1)
    kept: dict[str, list[torch.Tensor]] = {"mlp": [], "attention": [], "residual": []}
    hooks = []
    if masks:
        for layer in ref.model.layers:
            hooks += [
                layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: kept["mlp"].append(a[0])),
                layer.self_attn.register_forward_hook(lambda m, a, o: kept["attention"].append(o[0])),
                layer.register_forward_hook(lambda m, a, o: kept["residual"].append(o)),
            ]
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits[0, rows].float()
    for h in hooks:
        h.remove()
    log_r = ref_logits.log_softmax(-1)
    kl = (log_r.exp() * (log_r - log_p)).sum(-1)
    mask = None
    if masks:
        acts = {kind: [x[0, rows] for x in layers] for kind, layers in kept.items()}
        acts["logits"] = [ref_logits]
        mask = activation_mask(acts, torch.ones(len(response), dtype=torch.bool))
    return log_p.gather(-1, target)[:, 0], log_r.gather(-1, target)[:, 0], kl, mask


def reference_pairs(policy_dir, weights, ref_dir, pairs, params):
    """Mean loss over the pairs, gradients and the metrics, from the formulas."""
    policy, ref = load_model(policy_dir), load_model(ref_dir)
    policy.load_state_dict(weights)
    loss_name = params["loss"]
    per_pair, r_w, r_l, lp_w, lp_l, kls, masks, crit = [], [], [], [], [], [], [], []
    for p in pairs:
        lw, rw, klw, mw = full_tokens(policy, ref, p.prompt_ids, p.chosen_ids, loss_name == "sparsepo")
        ll, rl, kll, ml = full_tokens(policy, ref, p.prompt_ids, p.rejected_ids, loss_name == "sparsepo")
        if loss_name == "sparsepo":
            u = (mw * (lw - rw)).sum() - (ml * (ll - rl)).sum()
            d = (ml * kll).sum() - (mw * klw).sum()
            l1 = mw.abs().sum() + ml.abs().sum()
            loss = -logsigmoid(BETA * (u - d)) + LAMBDA_U * l1 + LAMBDA_D * l1
            delta_w, delta_l = (mw * (lw - rw)).sum(), (ml * (ll - rl)).sum()
            masks += [mw, ml]
        else:
            delta_w = (lw - rw).sum()
            weight = torch.tensor(p.rejected_weights) if loss_name == "cdpo" else 1.0
            delta_l = (weight * (ll - rl)).sum()
            z = delta_w - delta_l
            if loss_name == "tdpo1":
                z = z - (kll.sum() - klw.sum())
            if loss_name == "tdpo2":
                z = z - ALPHA * (kll.sum() - klw.sum().detach())
            loss = -logsigmoid(BETA * z)
            if loss_name == "cdpo":
                crit.append(weight)
        per_pair.append(loss)
        r_w.append(BETA * delta_w.item())
        r_l.append(BETA * delta_l.item())
        lp_w.append(lw.sum().item())
        lp_l.append(ll.sum().item())
        kls += [klw.detach(), kll.detach()]
    total = torch.stack(per_pair).mean()
    total.backward()
    grads = {"lm." + n: q.grad.clone() for n, q in policy.named_parameters()}
    metrics = {
        "rewards/accuracy": sum(a > b for a, b in zip(r_w, r_l)) / len(pairs),
        "rewards/margin": sum(a - b for a, b in zip(r_w, r_l)) / len(pairs),
        "rewards/chosen": sum(r_w) / len(pairs),
        "logps/chosen": sum(lp_w) / len(pairs),
        "logps/rejected": sum(lp_l) / len(pairs),
    }
    if loss_name in ("tdpo1", "tdpo2", "sparsepo"):
        metrics["kl/per_token"] = torch.cat(kls).mean().item()
    if masks:
        metrics["mask_u/mean"] = torch.cat(masks).mean().item()
    if crit:
        metrics["critical_weight/mean"] = torch.cat(crit).mean().item()
    return total.item(), grads, metrics


# ----- the learners -----------------------------------------------------------------------


def learner_group(model_dir, cfg, world: int, packing: str, lr: float) -> WorkerGroup:
    cfg.mode = "ray" if world > 1 else "inprocess"
    cfg.learner.num_learners, cfg.learner.zero_stage = world, 0
    cfg.learner.grad_clip, cfg.learner.packing = 0.0, packing
    return start_learner_group(
        cfg,
        model_dir,
        cfg.algorithm_spec(),
        LRSchedule(lr),
        pad_id=0,
        use_ray=world > 1,
        role=PairLearner if isinstance(cfg, DPOJobConfig) else Learner,
    )


def train_pairs(group, pairs, critical: bool, apply: bool, **split):
    parts = shard_pairs(pair_samples(pairs, critical), len(group), packed=split.pop("packed"), **split)
    for rank in parts:  # pair-atomic: both sides of every pair in one micro-batch
        for micro in rank:
            assert sorted(int(s.extra["pair_index"][0]) for s in micro) == sorted(
                2 * sorted({int(s.extra["pair_index"][0]) for s in micro})
            )
    results = group.call("train_pairs", per_rank=[(p, len(pairs), apply) for p in parts])
    sums = [s for _, s in results if s is not None]
    loss = sum(m.result()["loss"] for m, _ in results)
    return loss, sum(sums[1:], sums[0])


def assert_every_split(group, cfg, pairs, critical: bool, packing: str, ref_loss, ref_grads, ref_metrics):
    """Loss, gradients and metrics of one step (not applied) equal the reference's for
    every micro-batch split of `SPLITS[packing]`; returns the last split's PairSums."""
    for split in SPLITS[packing]:
        loss, sums = train_pairs(group, pairs, critical, apply=False, packed=packing == "packed", **split)
        assert loss == pytest.approx(ref_loss, rel=RTOL, abs=ATOL), split
        assert_gradients_match(group, ref_grads, RTOL, ATOL)
        metrics = preference_metrics(sums, cfg.algorithm)
        for name, want in ref_metrics.items():
            assert metrics[name] == pytest.approx(want, rel=1e-5, abs=1e-6), (split, name)
    return sums


def check_pairs(model_dir, loss_name: str, world: int, packing: str):
    cfg = DPOJobConfig(data={"path": "unused.jsonl"}, algorithm=LOSSES[loss_name])
    critical = loss_name == "cdpo"
    pairs = make_pairs()
    group = learner_group(model_dir, cfg, world, packing, lr=1e-2)
    try:
        # one large step away from the reference, then the exported policy is the one to match
        train_pairs(group, pairs[:3], critical, apply=True, packed=packing == "packed")
        group.call("zero_grad")
        weights = group.call("export_weights")[0]
        ref_loss, ref_grads, ref_metrics = reference_pairs(
            model_dir, weights, model_dir, pairs, LOSSES[loss_name]
        )
        assert ref_metrics.get("kl/per_token", 1.0) > 1e-3  # the policy moved: the KL terms matter
        assert_every_split(group, cfg, pairs, critical, packing, ref_loss, ref_grads, ref_metrics)
    finally:
        group.shutdown()


@pytest.mark.parametrize(
    "loss_name, packing",
    [
        ("dpo", "padded"),
        ("cdpo", "packed"),
        ("tdpo2", "padded"),
        ("sparsepo", "packed"),
        pytest.param("tdpo1", "packed", marks=pytest.mark.slow),
        pytest.param("sparsepo", "padded", marks=pytest.mark.slow),
    ],
)
def test_pair_loss_and_gradients_match_formula_for_every_split(model_dir, loss_name, packing):
    check_pairs(model_dir, loss_name, 1, packing)


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss_name, packing", [("tdpo2", "packed"), ("sparsepo", "padded"), ("dpo", "packed")]
)
def test_pair_losses_on_two_ranks(model_dir, ray_cluster, loss_name, packing):
    check_pairs(model_dir, loss_name, 2, packing)


# ----- SFT --------------------------------------------------------------------------------


def reference_sft(policy_dir, weights, ref_dir, samples, loss_name: str, asft_lambda: float):
    policy, ref = load_model(policy_dir), load_model(ref_dir)
    policy.load_state_dict(weights)
    per_token = []
    for s in samples:
        logp, _, kl, _ = full_tokens(policy, ref, s.prompt_ids, s.response_ids, masks=False)
        if loss_name == "nll":
            per_token.append(-logp)
        else:  # dft, and asft's anchor
            per_token.append(-logp.detach().exp() * logp + (asft_lambda * kl if loss_name == "asft" else 0))
    loss = torch.cat(per_token).mean()  # token-mean over the mini-batch
    loss.backward()
    return loss.item(), {"lm." + n: q.grad.clone() for n, q in policy.named_parameters()}


def sft_step(group, algorithm, samples, apply: bool, **split):
    weights = algorithm.token_weights(view(samples))
    for s, w in zip(samples, weights.split([s.num_tokens for s in samples])):
        s.weights = w
    parts = shard(samples, len(group), **split)
    results = group.call("train_minibatch", per_rank=[(p, apply) for p in parts])
    return sum(m.result()["loss"] for m in results)


def check_sft(model_dir, loss_name: str, world: int):
    params = {"loss": loss_name, **({"asft_lambda": 0.5} if loss_name == "asft" else {})}
    cfg = SFTJobConfig(data={"path": "unused.jsonl"}, algorithm=params)
    algorithm = build_algorithm(*cfg.algorithm_spec())
    samples = [
        Sample(prompt_ids=p.prompt_ids, response_ids=p.chosen_ids + p.rejected_ids)
        for p in make_pairs(seed=1)
    ]
    group = learner_group(model_dir, cfg, world, "padded", lr=1e-2)
    try:
        sft_step(group, algorithm, samples[:3], apply=True)
        group.call("zero_grad")
        weights = group.call("export_weights")[0]
        ref_loss, ref_grads = reference_sft(model_dir, weights, model_dir, samples, loss_name, 0.5)
        for split in SPLITS["padded"]:
            split = dict(max_seqs=split["max_seqs"] // 2)  # 6 sequences: 6 | 4 + 2 | 1 x 6
            loss = sft_step(group, algorithm, samples, apply=False, packed=False, **split)
            assert loss == pytest.approx(ref_loss, rel=RTOL, abs=ATOL), split
            assert_gradients_match(group, ref_grads, RTOL, ATOL)
    finally:
        group.shutdown()


@pytest.mark.parametrize("loss_name", ["nll", "dft", "asft"])
def test_sft_loss_and_gradients_match_formula_for_every_split(model_dir, loss_name):
    check_sft(model_dir, loss_name, 1)


@pytest.mark.slow
def test_asft_on_two_ranks(model_dir, ray_cluster):
    check_sft(model_dir, "asft", 2)
