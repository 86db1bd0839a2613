"""SparsePO with learned masks (docs/algorithms.md section 2 (b)) trained with the policy on the
DeepSpeed learner, exact under any cut of a mini-batch.

The harness of tests/test_offline_exactness.py: six pairs trained by `Learner.train_pairs`
in pair-atomic micro-batches of 1, 2 or all 6 pairs (padded) or under token budgets
(packed), on 1 rank in this process and on 2 ranks on Ray (slow tier), after one optimizer
step at a large learning rate that moves the policy and the mask networks. Loss, gradients
of the policy and of the mask networks (ZeRO-0) and the metrics must equal a computation
from the formula, one sequence at a time with full logits, the mask networks applied to the
reference's `output_hidden_states`. Dropout 0. Tolerance: fp32, rtol 1e-5 / atol 1e-7.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import logsigmoid

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.sparsepo import SparsePOMasks
from rlpost.config.offline import DPOJobConfig
from rlpost.data.pairs import pair_samples, shard_pairs
from rlpost.model.load import load_model
from tests.exactness.test_offline_exactness import (  # noqa: F401
    ATOL,
    BETA,
    LAMBDA_D,
    LAMBDA_U,
    RTOL,
    assert_every_split,
    full_tokens,
    learner_group,
    make_pairs,
    model_dir,  # (a fixture)
    train_pairs,
)


def learned(kind: str) -> dict:
    return {"loss": "sparsepo", "beta": BETA, "lambda_u": LAMBDA_U, "lambda_d": LAMBDA_D, "masks": kind}


def reference_learned(model_dir, weights, mask_weights, pairs, kind: str):
    """Mean loss over the pairs, gradients of the policy and the mask networks, metrics, and
    m^u of each rejected response."""
    policy, ref = load_model(model_dir), load_model(model_dir)
    policy.load_state_dict(weights)
    masks = SparsePOMasks(ref.config.num_hidden_layers, ref.config.hidden_size, kind)
    masks.load_state_dict({name.removeprefix("masks."): w for name, w in mask_weights.items()})
    per_pair, margins, kls, all_u, all_d, rejected_u = [], [], [], [], [], []
    for p in pairs:
        sides = []
        for response in (p.chosen_ids, p.rejected_ids):
            logp, ref_logp, kl, _ = full_tokens(policy, ref, p.prompt_ids, response, masks=False)
            ids = torch.tensor([p.prompt_ids + response])
            rows = slice(len(p.prompt_ids) - 1, ids.shape[1] - 1)  # predicting the response
            with torch.no_grad():
                states = ref(input_ids=ids, output_hidden_states=True).hidden_states[1:]
            m_u, m_d = masks([h[0, rows] for h in states])
            sides.append((logp - ref_logp, kl, m_u, m_d))
            kls.append(kl.detach())
            all_u.append(m_u.detach())
            all_d.append(m_d.detach())
        (ratio_w, kl_w, u_w, d_w), (ratio_l, kl_l, u_l, d_l) = sides
        rejected_u.append(u_l.detach())
        u = (u_w * ratio_w).sum() - (u_l * ratio_l).sum()
        d = (d_l * kl_l).sum() - (d_w * kl_w).sum()
        per_pair.append(
            -logsigmoid(BETA * (u - d))
            + LAMBDA_U * (u_w.abs().sum() + u_l.abs().sum())
            + LAMBDA_D * (d_w.abs().sum() + d_l.abs().sum())
        )
        margins.append(BETA * u.item())
    total = torch.stack(per_pair).mean()
    total.backward()
    grads = {"lm." + n: q.grad.clone() for n, q in policy.named_parameters()}
    grads.update({"masks." + n: q.grad.clone() for n, q in masks.named_parameters()})
    u_cat, d_cat = torch.cat(all_u), torch.cat(all_d)
    metrics = {
        "rewards/margin": sum(margins) / len(pairs),
        "kl/per_token": torch.cat(kls).mean().item(),
        "mask_u/mean": u_cat.mean().item(),
        "mask_u/sparsity": (u_cat == 0).double().mean().item(),
        "mask_d/mean": d_cat.mean().item(),
        "mask_d/sparsity": (d_cat == 0).double().mean().item(),
    }
    return total.item(), grads, metrics, rejected_u


def rejected_masks(group, pairs, packing: str) -> list[torch.Tensor]:
    """`Learner.rejected_masks` of the pairs, in their order."""
    parts = shard_pairs(pair_samples(pairs), len(group), max_seqs=4, packed=packing == "packed")
    masks = {}
    for rank in group.call("rejected_masks", per_rank=[(p,) for p in parts]):
        masks.update(rank)
    return [masks[i] for i in range(len(pairs))]


def check_learned(model_dir, kind: str, world: int, packing: str):
    cfg = DPOJobConfig(data={"path": "unused.jsonl"}, algorithm=learned(kind))
    pairs = make_pairs()
    group = learner_group(model_dir, cfg, world, packing, lr=1e-2)
    try:
        initial = group.call("named_parameters", "masks.")[0]
        train_pairs(group, pairs[:3], False, apply=True, packed=packing == "packed")
        group.call("zero_grad")
        weights = group.call("export_weights")[0]
        mask_weights = group.call("named_parameters", "masks.")[0]
        assert all(not torch.equal(initial[n], w) for n, w in mask_weights.items())  # they train
        ref_loss, ref_grads, ref_metrics, ref_rejected = reference_learned(
            model_dir, weights, mask_weights, pairs, kind
        )
        assert ref_metrics["kl/per_token"] > 1e-3  # the policy moved: the KL terms matter
        assert 0 < ref_metrics["mask_u/sparsity"] < 1  # the ReLUs cut some tokens, not all
        sums = assert_every_split(group, cfg, pairs, False, packing, ref_loss, ref_grads, ref_metrics)
        # what the token view shows: m^u of the rejected responses, without gradient
        for got, want in zip(rejected_masks(group, pairs, packing), ref_rejected, strict=True):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
        return sums
    finally:
        group.shutdown()


@pytest.mark.parametrize(
    "kind, packing",
    [
        ("common", "packed"),
        ("independent", "padded"),
        pytest.param("common", "padded", marks=pytest.mark.slow),
        pytest.param("independent", "packed", marks=pytest.mark.slow),
    ],
)
def test_learned_masks_loss_and_gradients_match_formula_for_every_split(model_dir, kind, packing):
    sums = check_learned(model_dir, kind, 1, packing)
    # common: m^d is m^u, to the bit; independent: another network, other values
    same = torch.equal(sums.reward_l1, sums.kl_l1) and torch.equal(sums.reward_zeros, sums.kl_zeros)
    assert same == (kind == "common")


@pytest.mark.slow
@pytest.mark.parametrize("kind, packing", [("independent", "packed"), ("common", "padded")])
def test_learned_masks_on_two_ranks(model_dir, ray_cluster, kind, packing):
    check_learned(model_dir, kind, 2, packing)


def test_mask_networks_are_seeded_and_sized_by_kind(model_dir):
    """The learner's initial networks depend on the seed alone (so every rank starts from
    the same ones), whatever the global RNG did before; common has one network, independent
    two (2 layers of width 64 here); the HF export holds the LM alone."""
    cfg = DPOJobConfig(data={"path": "unused.jsonl"}, algorithm=learned("independent"))
    group = learner_group(model_dir, cfg, 1, "padded", lr=1e-2)
    try:
        params = group.call("named_parameters", "masks.")[0]
        assert not any(k.startswith("masks.") for k in group.call("export_weights")[0])
    finally:
        group.shutdown()
    torch.manual_seed(cfg.seed + 1)
    again = dict(build_algorithm(*cfg.algorithm_spec()).mask_networks(2, 64, cfg.seed).named_parameters())
    assert params.keys() == {"masks." + n for n in again}
    for name, value in again.items():
        assert torch.equal(params["masks." + name], value.detach()), name
    assert {k.split(".")[1] for k in params} == {"reward", "divergence"}
    assert len(params) == 2 * (2 * 2 + 2 * 2 + 1)  # per net: 2 norms, 2 projections (weight, bias), mix
    common = build_algorithm(
        *DPOJobConfig(data={"path": "unused.jsonl"}, algorithm=learned("common")).algorithm_spec()
    ).mask_networks(2, 64, cfg.seed)
    assert {n.split(".")[0] for n, _ in common.named_parameters()} == {"reward"}


def test_learned_masks_resume_from_a_checkpoint(model_dir, tmp_path):
    """Save after one step, take a second; a fresh learner restored from the checkpoint has
    the saved mask parameters (not the seeded initial ones) and the Adam state: its second
    step ends at the same parameters, with the same loss."""
    cfg = DPOJobConfig(data={"path": "unused.jsonl"}, algorithm=learned("independent"))
    pairs = make_pairs()

    def second_step(group):
        loss, _ = train_pairs(group, pairs[3:], False, apply=True, packed=False)
        return loss, group.call("named_parameters")[0]

    group = learner_group(model_dir, cfg, 1, "padded", lr=1e-2)
    try:
        initial = group.call("named_parameters", "masks.")[0]
        train_pairs(group, pairs[:3], False, apply=True, packed=False)
        group.call("save_checkpoint", str(tmp_path), "step_1")
        saved = group.call("named_parameters", "masks.")[0]
        loss, after = second_step(group)
    finally:
        group.shutdown()
    group = learner_group(model_dir, cfg, 1, "padded", lr=1e-2)
    try:
        fresh = group.call("named_parameters", "masks.")[0]
        group.call("load_checkpoint", str(tmp_path), "step_1")
        restored = group.call("named_parameters", "masks.")[0]
        loss_again, after_again = second_step(group)
    finally:
        group.shutdown()
    for name in saved:
        assert torch.equal(fresh[name], initial[name]) and not torch.equal(saved[name], initial[name])
        assert torch.equal(restored[name], saved[name]), name
    assert loss_again == loss
    assert after_again.keys() == after.keys()
    for name, value in after.items():
        assert torch.equal(after_again[name], value), name


def test_rejected_activation_masks_match_whole_activations(model_dir):
    """`Learner.rejected_masks` with activation masks: SparsePO's mask of each rejected
    response from hooks that keep the whole activations and materialised logits."""
    cfg = DPOJobConfig(data={"path": "unused.jsonl"}, algorithm={"loss": "sparsepo"})
    pairs = make_pairs()
    group = learner_group(model_dir, cfg, 1, "packed", lr=1e-2)
    try:
        got = rejected_masks(group, pairs, "packed")
    finally:
        group.shutdown()
    ref = load_model(model_dir)
    for p, mask in zip(pairs, got, strict=True):
        want = full_tokens(ref, ref, p.prompt_ids, p.rejected_ids, masks=True)[3]
        torch.testing.assert_close(mask, want, rtol=RTOL, atol=1e-6)
    assert all(0 <= m.min() < m.max() <= 1 for m in got if len(m) > 2)  # not flat


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"loss": "tdpo1", "masks": "common"}, "algorithm.masks is set but algorithm.loss is 'tdpo1'"),
        ({"loss": "dpo", "mask_dropout": 0.1}, "algorithm.mask_dropout is set but algorithm.loss is 'dpo'"),
        (
            {"loss": "sparsepo", "mask_dropout": 0.1},
            "algorithm.mask_dropout is set but algorithm.masks is 'activation'",
        ),
        ({"loss": "sparsepo", "masks": "common", "mask_dropout": 1.0}, "mask_dropout"),
        ({"loss": "sparsepo", "masks": "shared"}, "masks"),
    ],
)
def test_config_names_the_mask_key(settings, message):
    with pytest.raises(ValueError, match=message):
        DPOJobConfig(data={"path": "unused.jsonl"}, algorithm=settings)


def test_config_of_learned_masks():
    ok = DPOJobConfig(
        data={"path": "unused.jsonl"},
        algorithm={"loss": "sparsepo", "masks": "independent", "mask_dropout": 0.1},
    )
    algorithm = build_algorithm(*ok.algorithm_spec())
    assert algorithm.learned_masks and not algorithm.activation_masks
    assert algorithm.mask_networks(2, 8, 0).reward.dropout.p == 0.1
